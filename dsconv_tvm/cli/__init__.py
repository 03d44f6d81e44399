"""``dsconv-tvm``: the command line, a thin layer over the Python API (:mod:`dsconv_tvm`).  One
module per verb, each with ``add_parser(sub)`` and ``cmd_<verb>(args)``; :mod:`.main` builds the
parser and maps errors to exit codes; :mod:`.common` holds the shared scheme options."""
