"""One module per CLI subcommand (see tilecrate.cli); each defines NAME, HELP, add_arguments(parser), run(args).

COMMANDS names them with a one-line summary so that `tilecrate` can list every command while
importing only the one that runs (a command's module imports what that command needs: numpy,
the compiled core, aiohttp for serve).
"""
COMMANDS = {
    "sample": "write a deterministic sample cache",
    "inspect": "show what a cache or package holds, per level",
    "estimate": "count the tiles of an export and the exact size of its package",
    "export": "export tiles to a .tpkx, a .tpk, a .vtpk or a cache folder",
    "serve": "serve caches as ArcGIS MapServer services with export jobs",
    "compare": "compare JPEG re-encoding qualities: size, speed and fidelity",
    "passwd": "read a password on stdin and print its password_hash line for [users.NAME]",
}
