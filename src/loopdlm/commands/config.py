"""`loopdlm config`: every config key with its type, default and meaning (from the dataclasses, so it cannot
drift), or a preset/YAML file resolved with overrides."""

from __future__ import annotations

import dataclasses

import yaml

from loopdlm.config import RunConfig, available_presets, load_config
from loopdlm.settings import CHECK, HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="list every config key with its default and meaning, or show a "
                                   "resolved config")
    parser.add_argument("--list", action="store_true", help="list every key: section.key, type, default, meaning "
                        "(what runs without arguments)")
    parser.add_argument("--show", metavar="CONFIG", default=None,
                        help=f"print this preset ({', '.join(available_presets())}) or YAML file as YAML, with the "
                        "overrides applied")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for --show")
    parser.set_defaults(func=run)


def run(args) -> None:
    if args.show is not None:
        print(yaml.safe_dump(load_config(args.show, args.overrides).to_dict(), sort_keys=False), end="")
        return
    rows = list(config_rows())
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def config_rows():
    """(section.key, type, default, meaning) for every field of every section of `RunConfig` (nested groups, e.g.
    sample.wino, list their keys as sample.wino.tau1)."""
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        yield from _rows(section.name, getattr(defaults, section.name))


def _rows(prefix: str, values):
    for spec in dataclasses.fields(values):
        default = getattr(values, spec.name)
        if dataclasses.is_dataclass(default):
            yield from _rows(f"{prefix}.{spec.name}", default)
            continue
        meaning = spec.metadata.get(HELP, "")
        if CHECK in spec.metadata:
            meaning += f" [{spec.metadata[CHECK]}]"
        yield (f"{prefix}.{spec.name}", str(spec.type), "null" if default is None else
               yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n..."), meaning)
