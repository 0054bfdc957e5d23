"""The `diffseg_synthetic` tfds builder and its pure-NumPy generators (lesion / nuclei / clusters fingerprints)."""

from diffseg_jax.data.synthetic.synthetic import (
    KINDS,
    SPLITS,
    DiffsegSynthetic,
    SyntheticConfig,
    check_kind,
    example_id,
    example_rng,
    generate,
    make_builder,
    make_example,
)

__all__ = [
    "KINDS",
    "SPLITS",
    "DiffsegSynthetic",
    "SyntheticConfig",
    "check_kind",
    "example_id",
    "example_rng",
    "generate",
    "make_builder",
    "make_example",
]
