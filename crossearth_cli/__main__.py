from crossearth_cli.cli import main

main()
