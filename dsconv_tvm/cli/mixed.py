"""``--bits auto`` for ``compile``, ``eval`` and ``adapt``: per-layer bits chosen by sensitivity under a
byte budget (:func:`dsconv_tvm.accuracy.mixed.choose_bits`), and the ``--sensitivity`` report."""

from __future__ import annotations

from ..errors import ConfigError
from ..fileio import atomic_write_text, check_output_path
from .common import log


def resolve_bits(args, model_path: str, config, calibration=None, target: str = "x86", input_shapes=None):
    """(config with the per-layer bits, the Allocation or None).  A model written by
    ``adapt --bits auto`` keeps the bits it was adapted for (read from its metadata)."""
    from ..accuracy.mixed import adapted_layer_bits, choose_bits, format_allocation, plot_allocation

    auto = getattr(args, "bits", None) == "auto"
    if not auto:
        if getattr(args, "weight_bytes", None) is not None:
            raise ConfigError("--weight-bytes needs --bits auto")
        return config, None
    adapted = adapted_layer_bits(model_path)
    if adapted:
        log(f"--bits auto: {model_path} was adapted with per-layer bits; using them "
            f"({', '.join(f'W{b}' for b in sorted(set(adapted.values())))})")
        return config.replace(layer_bits=adapted), None
    if args.weight_bytes is None:
        raise ConfigError("--bits auto needs --weight-bytes R (deployed conv weight bytes as a fraction of fp32)")
    if args.sensitivity:
        for ext in (".md", ".png"):
            check_output_path(args.sensitivity + ext)
    log("--bits auto: per-layer sensitivity " + ("on the calibration inputs" if calibration is not None
                                                  else "from the weights (data-free: no calibration inputs)"))
    alloc = choose_bits(model_path, config, args.weight_bytes, calibration, target, input_shapes, log=log)
    table = format_allocation(alloc)
    if args.sensitivity:
        atomic_write_text(args.sensitivity + ".md", "```\n" + table + "\n```\n")
        plot_allocation(alloc, args.sensitivity + ".png")
        log(f"wrote {args.sensitivity}.md and {args.sensitivity}.png")
    print(table)
    return config.replace(layer_bits=alloc.layer_bits), alloc
