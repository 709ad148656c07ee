from lightning_meta.cli import main

main()
