"""`python -m tinygemma` and the `tinygemma` command: the CLI, with a Ctrl-C pressed while it is still importing
(torch takes a second or two) ending as one line and exit status 130, as one pressed later does (cli.main)."""

import sys


def main() -> int:
    try:
        from tinygemma.cli import main as cli_main
    except KeyboardInterrupt:
        print("tinygemma: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
