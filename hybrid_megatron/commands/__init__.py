"""Subcommand groups of the `hybrid-megatron` command line (argument parsing and handlers).

Modules here import only the standard library at import time; each handler imports the
package parts it runs, so building the parser (and `--help`) stays fast.
"""
