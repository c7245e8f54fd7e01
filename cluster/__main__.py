"""`python -m ringpipe.cluster ...` is the `ringpipe` command, for machines where it is not installed;
`run` is also the installed `ringpipe` script's entry point."""
import sys


def run():
    """The CLI, with Ctrl-C while its modules are still importing (the first second or so) ending as
    it does later: one line and exit status 130, not an import traceback."""
    try:
        from ringpipe.cluster.cli import main
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    main(prog_name="ringpipe")


if __name__ == "__main__":  # pragma: no cover
    run()
