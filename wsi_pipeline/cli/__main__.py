from wsi_pipeline.cli.commands import main

main()
