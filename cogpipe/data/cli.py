"""`cogpipe data index|encode|verify`: the data commands at any scale (docs/data.md).

    cogpipe data index SOURCE... --out M                         probe every clip once into a manifest
    cogpipe data encode --config RECIPE --manifest M --out S     encode on Ray Data into a latent store
    cogpipe data verify S                                        check every shard against its checksum
"""

import importlib

SUBCOMMANDS = {
    "index": ("cogpipe.data.index", "probe every clip of the sources once (Ray tasks) into a manifest"),
    "encode": ("cogpipe.data.encode", "encode a manifest's clips on Ray Data into a latent store"),
    "verify": ("cogpipe.data.store", "check every shard of a latent store against its checksum"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_data_module=module)
        importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    return importlib.import_module(args._data_module).run(args)
