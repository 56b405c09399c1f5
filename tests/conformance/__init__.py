"""Conformance cases: third-party style model code that hwaware must compile."""
