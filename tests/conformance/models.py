"""The conformance corpus: models from code nobody on the hwaware team wrote.

Each entry of `CASES` is a `CaseFactory`: a family tag and a zero-argument function that builds
a `Case` (the model in eval mode with seeded random weights, in a tiny configuration, and
several example input tuples). The first input tuple is what every entry point compiles with;
the others have the same shapes and different values (for dynamic networks, values that take
every path). Nothing is downloaded: every model is built from a config.

Families: `attention` (encoders, vision transformers and speech encoders on raw waveforms),
`decoder` (causal LMs, mixture-of-experts and state-space ones included), `encdec`
(encoder-decoders, Whisper on audio features), `cnn` (convolutional vision models), `gnn`
(PyTorch Geometric layers and models, some with edge features) and
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


def graph_edge_inputs(dim: int = 4, n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """(x, edge_index, edge_attr) tuples: `graph_inputs` with `dim` features per edge."""
    return [(x, edge_index, torch.randn(EDGES, dim, generator=_generator(200 + i)))
            for i, (x, edge_index) in enumerate(graph_inputs(n=n))]


def waveform_inputs(samples: int = 400, n: int = 3) -> list[tuple[torch.Tensor]]:
    return [(torch.randn(1, samples, generator=_generator(300 + i)),) for i in range(n)]


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


def hf_audio(model_cls: str, config_cls: str, **config: Any) -> CaseFactory:
    """A `transformers` speech encoder (attention family) on (1, 400) raw waveforms."""
    config = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64, "conv_dim": (16, 16),
              "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
              "num_conv_pos_embedding_groups": 4, **config}

    def build() -> Case:
        return Case(_hf_model(model_cls, config_cls, config), waveform_inputs())
    return CaseFactory("attention", build, f"transformers.{model_cls}")


def _whisper() -> Case:
    """Whisper on (1, 8 mel bins, 32 frames) features and 4 decoder tokens."""
    config = {"vocab_size": VOCAB, "num_mel_bins": 8, "max_source_positions": 16,
              "max_target_positions": 16, "d_model": 32, "encoder_layers": 2,
              "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
              "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, "decoder_start_token_id": 1, "use_cache": False}
    model = positional(_hf_model("WhisperModel", "WhisperConfig", config),
                       ["input_features", "decoder_input_ids"])
    inputs = []
    for i in range(3):
        g = _generator(400 + i)
        inputs.append((torch.randn(1, 8, 32, generator=g),
                       torch.randint(1, VOCAB, (1, 4), generator=g)))
    return Case(model, inputs)


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
    "funnel": hf_text(
        "attention", "FunnelModel", "FunnelConfig", vocab_size=VOCAB, d_model=32, n_head=2,
        d_head=16, d_inner=64, block_sizes=[1, 1], num_decoder_layers=1),
    "squeezebert": hf_text(
        "attention", "SqueezeBertModel", "SqueezeBertConfig", **BERTLIKE, embedding_size=32,
        q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
        output_groups=2),
    "mobilebert": hf_text(
        "attention", "MobileBertModel", "MobileBertConfig", **TEXT, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, embedding_size=16,
        intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2),
    "roformer": hf_text(
        "attention", "RoFormerModel", "RoFormerConfig", **BERTLIKE, embedding_size=32),
    "esm": hf_text(
        "attention", "EsmModel", "EsmConfig", **BERTLIKE, position_embedding_type="rotary",
        pad_token_id=1),
    "xlnet": hf_text(
        "attention", "XLNetModel", "XLNetConfig", vocab_size=VOCAB, d_model=32, n_layer=2,
        n_head=2, d_inner=64, use_mems_eval=False),
    "megatron_bert": hf_text("attention", "MegatronBertModel", "MegatronBertConfig", **BERTLIKE),
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
    "gptj": hf_text(
        "decoder", "GPTJModel", "GPTJConfig", vocab_size=VOCAB, n_positions=64, n_embd=32,
        n_layer=2, n_head=4, rotary_dim=4, use_cache=False),
    "gpt_neox": hf_text(
        "decoder", "GPTNeoXModel", "GPTNeoXConfig", **TEXT, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, rotary_pct=0.5,
        use_cache=False),
    "codegen": hf_text(
        "decoder", "CodeGenModel", "CodeGenConfig", vocab_size=VOCAB, n_positions=64, n_ctx=64,
        n_embd=32, n_layer=2, n_head=4, rotary_dim=4, use_cache=False),
    "stablelm": hf_text("decoder", "StableLmModel", "StableLmConfig", **DECODER),
    "starcoder2": hf_text("decoder", "Starcoder2Model", "Starcoder2Config", **DECODER),
    "olmo": hf_text("decoder", "OlmoModel", "OlmoConfig", **DECODER),
    "phi3": hf_text("decoder", "Phi3Model", "Phi3Config", **DECODER, pad_token_id=0),
    "gemma2": hf_text(
        "decoder", "Gemma2Model", "Gemma2Config", **DECODER, head_dim=8, sliding_window=4),
    "mpt": hf_text(
        "decoder", "MptModel", "MptConfig", vocab_size=VOCAB, d_model=32, n_layers=2,
        n_heads=4, max_seq_len=64, use_cache=False),
    "xglm": hf_text(
        "decoder", "XGLMModel", "XGLMConfig", vocab_size=VOCAB, max_position_embeddings=64,
        d_model=32, num_layers=2, attention_heads=2, ffn_dim=64, use_cache=False),
    "biogpt": hf_text("decoder", "BioGptModel", "BioGptConfig", **BERTLIKE, use_cache=False),
    # mixture-of-experts decoders: data-dependent routing, and transformers' own custom
    # operator (`transformers::grouped_mm_fallback`) for the experts on CPU
    "mixtral": hf_text(
        "decoder", "MixtralModel", "MixtralConfig", **DECODER, num_local_experts=4,
        num_experts_per_tok=2),
    "qwen2_moe": hf_text(
        "decoder", "Qwen2MoeModel", "Qwen2MoeConfig", **DECODER, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    # a state-space model: the selective scan as transformers' PyTorch fallback loops it
    "mamba": hf_text(
        "decoder", "MambaModel", "MambaConfig", vocab_size=VOCAB, hidden_size=32, state_size=4,
        num_hidden_layers=2, expand=2, conv_kernel=4, use_cache=False),
    # encoder-decoders: forward(input_ids, attention_mask, decoder_input_ids)
    "t5": hf_text(
        "encdec", "T5Model", "T5Config", seq2seq=True, vocab_size=VOCAB, d_model=32, d_kv=16,
        d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, use_cache=False),
    "bart": hf_text("encdec", "BartModel", "BartConfig", seq2seq=True, **SEQ2SEQ),
    "marian": hf_text(
        "encdec", "MarianModel", "MarianConfig", seq2seq=True, **SEQ2SEQ, pad_token_id=0,
        decoder_start_token_id=0),
    "pegasus": hf_text(
        "encdec", "PegasusModel", "PegasusConfig", seq2seq=True, **SEQ2SEQ, pad_token_id=0,
        decoder_start_token_id=0),
    "mbart": hf_text("encdec", "MBartModel", "MBartConfig", seq2seq=True, **SEQ2SEQ),
    "m2m100": hf_text("encdec", "M2M100Model", "M2M100Config", seq2seq=True, **SEQ2SEQ),
    "mt5": hf_text(
        "encdec", "MT5Model", "MT5Config", seq2seq=True, vocab_size=VOCAB, d_model=32, d_kv=16,
        d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", use_cache=False),
    "switch_transformers": hf_text(
        "encdec", "SwitchTransformersModel", "SwitchTransformersConfig", seq2seq=True,
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, num_experts=4, relative_attention_num_buckets=8, use_cache=False),
    "whisper": CaseFactory("encdec", lambda: _whisper(), "transformers.WhisperModel"),
    # speech encoders on raw waveforms: convolutional feature extractor, positional conv
    "wav2vec2": hf_audio("Wav2Vec2Model", "Wav2Vec2Config"),
    "hubert": hf_audio("HubertModel", "HubertConfig"),
    "wavlm": hf_audio("WavLMModel", "WavLMConfig", num_buckets=16, max_bucket_distance=32),
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
    "levit": hf_vision(
        "attention", "LevitModel", "LevitConfig", size=64, image_size=64,
        hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
        key_dim=[8, 8, 8]),
    "pvt_v2": hf_vision(
        "attention", "PvtV2Model", "PvtV2Config", hidden_sizes=[16, 32], depths=[1, 1],
        num_encoder_blocks=2, sr_ratios=[2, 1], num_attention_heads=[1, 2], patch_sizes=[7, 3],
        strides=[4, 2], mlp_ratios=[2, 2]),
    "swinv2": hf_vision(
        "attention", "Swinv2Model", "Swinv2Config", image_size=IMAGE, patch_size=4,
        embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, mlp_ratio=2.0),
    "mobilevitv2": hf_vision(
        "attention", "MobileViTV2Model", "MobileViTV2Config", size=64, image_size=64,
        width_multiplier=0.5),
    # convolutional
    "focalnet": hf_vision(
        "cnn", "FocalNetModel", "FocalNetConfig", image_size=IMAGE, patch_size=4, embed_dim=16,
        depths=[1, 1], hidden_sizes=[16, 32]),
    "convnextv2": hf_vision(
        "cnn", "ConvNextV2Model", "ConvNextV2Config", hidden_sizes=[16, 32], depths=[1, 1],
        num_stages=2),
    "bit": hf_vision(
        "cnn", "BitModel", "BitConfig", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        layer_type="bottleneck", global_padding="SAME", num_groups=4),
    "resnet_bottleneck": hf_vision(
        "cnn", "ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[32, 64],
        depths=[1, 1], layer_type="bottleneck", downsample_in_bottleneck=True),
    "mobilenet_v1": hf_vision(
        "cnn", "MobileNetV1Model", "MobileNetV1Config", image_size=IMAGE, depth_multiplier=0.25,
        tf_padding=True),
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


def pyg(make: Callable[[], nn.Module], relations: bool = False,
        edge_features: bool = False) -> CaseFactory:
    """A factory for a PyTorch Geometric model or layer on small random graphs (with edge types,
    or 4 features per edge, when asked)."""
    def build() -> Case:
        inputs = graph_edge_inputs() if edge_features else graph_inputs(relations)
        return Case(_seeded(make), inputs)
    return CaseFactory("gnn", build, "torch_geometric")


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


def _gine() -> nn.Module:
    from torch_geometric import nn as gnn

    mlp = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN))
    return gnn.GINEConv(mlp, edge_dim=4)


def _pna() -> nn.Module:
    from torch_geometric.nn import models

    return models.PNA(FEATURES, HIDDEN, num_layers=2, out_channels=8,
                      aggregators=["mean", "min", "max", "std"],
                      scalers=["identity", "amplification", "attenuation"],
                      deg=torch.tensor([1, 4, 6, 5, 3, 1]))


class TwoGraphBatch(nn.Module):
    """A graph-level model on a batch of two graphs (the nodes' first and second halves), as
    PyG's `DataLoader` batches them: the batch vector is built inside, from the node count."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
                ) -> torch.Tensor:
        batch = (torch.arange(x.shape[0]) >= x.shape[0] // 2).long()
        return self.model(x, edge_index, edge_attr, batch)


def _attentive_fp() -> nn.Module:
    from torch_geometric.nn import models

    return TwoGraphBatch(models.AttentiveFP(FEATURES, HIDDEN, 8, edge_dim=4, num_layers=2,
                                            num_timesteps=2))


def _simple(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A PyG module with no input/output channel arguments (propagation only, or its own)."""
    def make() -> nn.Module:
        from torch_geometric import nn as gnn

        return getattr(gnn, name)(**kwargs)
    return make


def _graph_unet() -> nn.Module:
    from torch_geometric.nn import models

    return models.GraphUNet(FEATURES, HIDDEN, 8, depth=2, pool_ratios=0.5)


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
    "gine": pyg(_gine, edge_features=True),
    "attentivefp": pyg(_attentive_fp, edge_features=True),
    "pna": pyg(_pna),
    "graph_unet": pyg(_graph_unet),  # top-k pooling: data-dependent node selection
    "appnp": pyg(_simple("APPNP", K=3, alpha=0.1)),
    "gated_graph": pyg(_simple("GatedGraphConv", out_channels=HIDDEN, num_layers=2)),
    "cheb": pyg(_conv("ChebConv", K=3)),
    "sgconv": pyg(_conv("SGConv", K=2)),
    "tagconv": pyg(_conv("TAGConv", K=2)),
    "arma": pyg(_conv("ARMAConv", num_stacks=2, num_layers=2)),
    "resgated": pyg(_conv("ResGatedGraphConv")),
    "genconv": pyg(_conv("GENConv", aggr="softmax", learn_t=True)),
    "generalconv": pyg(_conv("GeneralConv", attention=True, heads=2)),
    "leconv": pyg(_conv("LEConv")),
    "clustergcn": pyg(_conv("ClusterGCNConv")),
    "filmconv": pyg(_conv("FiLMConv")),
    "mixhop": pyg(_conv("MixHopConv")),
    "ssgconv": pyg(_conv("SSGConv", alpha=0.1, K=2)),
    "feast": pyg(_conv("FeaStConv", heads=2)),
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

