from wsi_pipeline.cli import run

run()
