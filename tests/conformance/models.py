"""The conformance corpus: models from code nobody on the hwaware team wrote.

Each entry of `CASES` is a `CaseFactory`: a family tag and a zero-argument function that builds
a `Case` (the model in eval mode with seeded random weights, in a tiny configuration, and
several example input tuples). The first input tuple is what every entry point compiles with;
the others have the same shapes and different values (for dynamic networks, values that take
every path). Nothing is downloaded: every model is built from a config.

Families: `attention` (encoders and vision transformers), `decoder` (causal LMs), `encdec`
(encoder-decoders), `cnn` (convolutional vision models), `gnn` (PyTorch Geometric) and
`dynamic` (the dynamic-network styles of `tests/conformance/dynamic_styles.py`, when present).

Third-party packages are imported inside the factories, so importing this module is cheap and
works without `transformers` or `torch_geometric` installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEED = 0
VOCAB = 100
SEQ = 8
IMAGE = 32
NODES, EDGES, FEATURES, RELATIONS = 20, 60, 16, 3
FAMILIES = ("attention", "decoder", "encdec", "cnn", "gnn", "dynamic")


@dataclass
class Case:
    """One model and its example inputs (positional tuples; inputs[0] is the compile example)."""

    model: nn.Module
    inputs: list[tuple[Any, ...]]


@dataclass(frozen=True)
class CaseFactory:
    """A registry entry: builds its `Case` on demand (building imports third-party code)."""

    family: str
    build: Callable[[], Case]
    source: str = ""  # where the model's code comes from, for the report

    def __call__(self) -> Case:
        return self.build()


# ------------------------------------------------------------------------------ inputs
def _generator(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + 1000 + offset)


def token_inputs(with_mask: bool = True, n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids[, attention_mask]) tuples; the second tuple pads its last 3 tokens."""
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (1, SEQ), generator=_generator(i))
        mask = torch.ones(1, SEQ, dtype=torch.long)
        if i == 1:
            mask[:, -3:] = 0
        out.append((ids, mask) if with_mask else (ids,))
    return out


def seq2seq_inputs(n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask, decoder_input_ids) tuples."""
    out = []
    for i, (ids, mask) in enumerate(token_inputs(n=n)):
        dec = torch.randint(1, VOCAB, (1, SEQ // 2), generator=_generator(100 + i))
        out.append((ids, mask, dec))
    return out


def image_inputs(size: int = IMAGE, n: int = 3) -> list[tuple[torch.Tensor]]:
    return [(torch.randn(1, 3, size, size, generator=_generator(i)),) for i in range(n)]


def graph_inputs(relations: bool = False, n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """(x, edge_index[, edge_type]) tuples: random graphs of the same sizes."""
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(n):
        g = _generator(i)
        x = torch.randn(NODES, FEATURES, generator=g)
        edge_index = torch.randint(0, NODES, (2, EDGES), generator=g)
        if relations:
            out.append((x, edge_index, torch.randint(0, RELATIONS, (EDGES,), generator=g)))
        else:
            out.append((x, edge_index))
    return out


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    return make().eval()


# ------------------------------------------------------------------------ transformers
TEXT = {"vocab_size": VOCAB, "max_position_embeddings": 64}
BERTLIKE = {**TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}
DECODER = {**TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "use_cache": False}


def _hf_model(model_cls: str, config_cls: str, config: dict[str, Any]) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config_cls)(**config)
    return randomize(_seeded(lambda: getattr(transformers, model_cls)(cfg)))


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Make what Hugging Face initialises to constants random too: BatchNorm statistics and the
    affine parameters of norms (a fold or fusion that drops them must show), and He-normal
    convolution weights (HF's std-0.02 init makes deep tiny CNNs output ~1e-26, which any
    result matches)."""
    g = torch.Generator().manual_seed(SEED + 7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) \
                and getattr(m, "weight", None) is not None:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
    return model


def hf_text(family: str, model_cls: str, config_cls: str, seq2seq: bool = False,
            **config: Any) -> CaseFactory:
    """A `transformers` text model built from `config_cls(**config)`, on token ids + mask
    (+ decoder_input_ids for an encoder-decoder)."""
    names = ["input_ids", "attention_mask"] + (["decoder_input_ids"] if seq2seq else [])

    def build() -> Case:
        model = positional(_hf_model(model_cls, config_cls, config), names)
        return Case(model, seq2seq_inputs() if seq2seq else token_inputs())
    return CaseFactory(family, build, f"transformers.{model_cls}")


class KeywordCall(nn.Module):
    """Calls `model(**dict(zip(names, args)))`: for a forward whose positional order differs
    (GPT-2's second parameter is past_key_values). Only the argument order is adapted."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


def positional(model: nn.Module, names: list[str]) -> nn.Module:
    """`model` itself when its forward takes `names` first, in that order; else a KeywordCall."""
    params = list(inspect.signature(model.forward).parameters)
    return model if params[:len(names)] == names else KeywordCall(model, names).eval()


def hf_vision(family: str, model_cls: str, config_cls: str, size: int = IMAGE,
              **config: Any) -> CaseFactory:
    """A `transformers` vision model on (1, 3, size, size) images."""
    def build() -> Case:
        return Case(_hf_model(model_cls, config_cls, config), image_inputs(size))
    return CaseFactory(family, build, f"transformers.{model_cls}")


SEQ2SEQ = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
           "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
           "decoder_ffn_dim": 64, "max_position_embeddings": 64, "use_cache": False}
VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 64, "image_size": IMAGE, "patch_size": 8}

TRANSFORMERS: dict[str, CaseFactory] = {
    # encoders
    "bert": hf_text("attention", "BertModel", "BertConfig", **BERTLIKE),
    "roberta": hf_text("attention", "RobertaModel", "RobertaConfig", **BERTLIKE),
    "deberta_v2": hf_text(
        "attention", "DebertaV2Model", "DebertaV2Config", **BERTLIKE,
        relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]),
    "albert": hf_text("attention", "AlbertModel", "AlbertConfig", **BERTLIKE, embedding_size=16),
    "electra": hf_text(
        "attention", "ElectraModel", "ElectraConfig", **BERTLIKE, embedding_size=16),
    "distilbert": hf_text(
        "attention", "DistilBertModel", "DistilBertConfig", **TEXT,
        dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "mpnet": hf_text("attention", "MPNetModel", "MPNetConfig", **BERTLIKE),
    "convbert": hf_text(
        "attention", "ConvBertModel", "ConvBertConfig", **BERTLIKE,
        embedding_size=32, conv_kernel_size=3),
    # decoders: causal masks, rotary embeddings, GQA (4 heads / 2 KV heads) where supported
    "gpt2": hf_text(
        "decoder", "GPT2Model", "GPT2Config", vocab_size=VOCAB, n_positions=64,
        n_embd=32, n_layer=2, n_head=2, use_cache=False),
    "gpt_neo": hf_text(
        "decoder", "GPTNeoModel", "GPTNeoConfig", **TEXT, hidden_size=32, num_layers=2,
        num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4,
        intermediate_size=64, use_cache=False),
    "opt": hf_text(
        "decoder", "OPTModel", "OPTConfig", **TEXT, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, use_cache=False),
    "llama": hf_text("decoder", "LlamaModel", "LlamaConfig", **DECODER),
    "mistral": hf_text("decoder", "MistralModel", "MistralConfig", **DECODER, sliding_window=4),
    "qwen2": hf_text("decoder", "Qwen2Model", "Qwen2Config", **DECODER),
    "phi": hf_text("decoder", "PhiModel", "PhiConfig", **DECODER, partial_rotary_factor=0.5),
    "gemma": hf_text("decoder", "GemmaModel", "GemmaConfig", **DECODER, head_dim=8),
    "gpt_bigcode": hf_text(
        "decoder", "GPTBigCodeModel", "GPTBigCodeConfig", vocab_size=VOCAB, n_positions=64,
        n_embd=32, n_layer=2, n_head=4, multi_query=True, use_cache=False),
    "bloom": hf_text(
        "decoder", "BloomModel", "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2,
        n_head=4, use_cache=False),
    "falcon": hf_text(
        "decoder", "FalconModel", "FalconConfig", **TEXT, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, use_cache=False),
    # encoder-decoders: forward(input_ids, attention_mask, decoder_input_ids)
    "t5": hf_text(
        "encdec", "T5Model", "T5Config", seq2seq=True, vocab_size=VOCAB, d_model=32, d_kv=16,
        d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, use_cache=False),
    "bart": hf_text("encdec", "BartModel", "BartConfig", seq2seq=True, **SEQ2SEQ),
    "marian": hf_text(
        "encdec", "MarianModel", "MarianConfig", seq2seq=True, **SEQ2SEQ, pad_token_id=0,
        decoder_start_token_id=0),
    # vision transformers and hybrids
    "vit": hf_vision("attention", "ViTModel", "ViTConfig", **VIT),
    "deit": hf_vision("attention", "DeiTModel", "DeiTConfig", **VIT),
    "beit": hf_vision(
        "attention", "BeitModel", "BeitConfig", **VIT, use_relative_position_bias=True),
    "dinov2": hf_vision("attention", "Dinov2Model", "Dinov2Config", **VIT, mlp_ratio=2),
    "clip_vision": hf_vision("attention", "CLIPVisionModel", "CLIPVisionConfig", **VIT),
    "swin": hf_vision(
        "attention", "SwinModel", "SwinConfig", image_size=IMAGE, patch_size=4, embed_dim=16,
        depths=[1, 1], num_heads=[2, 2], window_size=4, mlp_ratio=2.0),
    "segformer": hf_vision(
        "attention", "SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1],
        sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "mobilevit": hf_vision(
        "attention", "MobileViTModel", "MobileViTConfig", size=64, image_size=64,
        hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2, expand_ratio=2.0),
    # convolutional
    "convnext": hf_vision(
        "cnn", "ConvNextModel", "ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 1],
        num_stages=2),
    "resnet": hf_vision(
        "cnn", "ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32],
        depths=[1, 1], layer_type="basic"),
    "regnet": hf_vision(
        "cnn", "RegNetModel", "RegNetConfig", embedding_size=16, hidden_sizes=[16, 32],
        depths=[1, 1], groups_width=8),
    "mobilenet_v2": hf_vision(
        "cnn", "MobileNetV2Model", "MobileNetV2Config", image_size=IMAGE, depth_multiplier=0.25),
    "efficientnet": hf_vision(
        "cnn", "EfficientNetModel", "EfficientNetConfig", size=64, image_size=64,
        width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
    "poolformer": hf_vision(
        "cnn", "PoolFormerModel", "PoolFormerConfig", hidden_sizes=[16, 32], depths=[1, 1],
        num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1],
        mlp_ratio=2.0),
}


# ---------------------------------------------------------------------- torch_geometric
HIDDEN = 32


def pyg(make: Callable[[], nn.Module], relations: bool = False) -> CaseFactory:
    """A factory for a PyTorch Geometric model or layer on small random graphs."""
    return CaseFactory("gnn", lambda: Case(_seeded(make), graph_inputs(relations)),
                       "torch_geometric")


def _basic_gnn(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torch_geometric.nn import models

        return getattr(models, name)(FEATURES, HIDDEN, num_layers=2, out_channels=8, **kwargs)
    return make


def _conv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torch_geometric import nn as gnn

        return getattr(gnn, name)(FEATURES, HIDDEN, **kwargs)
    return make


GNNS: dict[str, CaseFactory] = {
    "gcn": pyg(_basic_gnn("GCN")),
    "gat": pyg(_basic_gnn("GAT", heads=2)),
    "gatv2": pyg(_basic_gnn("GAT", heads=2, v2=True)),
    "gin": pyg(_basic_gnn("GIN")),
    "graphsage": pyg(_basic_gnn("GraphSAGE")),
    "edgeconv": pyg(_basic_gnn("EdgeCNN")),
    "rgcn": pyg(_conv("RGCNConv", num_relations=RELATIONS), relations=True),
    "graphconv": pyg(_conv("GraphConv", aggr="mean")),
    "transformerconv": pyg(_conv("TransformerConv", heads=2)),
}


# ------------------------------------------------------------------------------ dynamic
def dynamic_cases() -> dict[str, CaseFactory]:
    """The dynamic-network styles of `dynamic_styles.CASES`, if that module exists yet."""
    try:
        from tests.conformance import dynamic_styles
    except ImportError:
        return {}
    out = {}
    for name, make in dynamic_styles.CASES.items():
        def build(make: Callable[[], tuple[nn.Module, list[tuple[Any, ...]]]] = make) -> Case:
            model, inputs = make()
            return Case(model.eval(), list(inputs))
        out[name] = CaseFactory("dynamic", build, "dynamic_styles")
    return out


CASES: dict[str, CaseFactory] = {**TRANSFORMERS, **GNNS, **dynamic_cases()}


def get_case(name: str) -> Case:
    """Build the case called `name`; an unknown name lists the valid ones."""
    if name not in CASES:
        raise KeyError(f"unknown conformance model {name!r}; known: {', '.join(sorted(CASES))}")
    return CASES[name]()
