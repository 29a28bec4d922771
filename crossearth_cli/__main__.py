from crossearth_cli.cli import main

if __name__ == "__main__":  # worker processes started with "spawn" must not rerun the CLI
    main()
