"""`python -m ringpipe.cluster ...` is the `ringpipe` command, for machines where it is not installed."""


def run():
    from ringpipe.cluster.cli import main

    main(prog_name="ringpipe")


if __name__ == "__main__":  # pragma: no cover
    run()
