"""``wsi-infer import-model``, ``check-model`` and ``model-schema``: bring your own model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from wsi_pipeline.cli.group import (
    _POSITIVE,
    _device_options,
    _run_guarded,
    main,
)


@main.command("import-model")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="ONNX file to write; its card NAME.json is written beside it.",
)
@click.option("--name", default=None, help="Model name on the card [default: the folder's name].")
@click.option(
    "--positive-class",
    default=None,
    help="Class the heatmap and label show [default: the one class named tumour/tumor].",
)
@click.option(
    "--output-kind",
    type=click.Choice(["logits", "probabilities"]),
    default="logits",
    show_default=True,
    help="What the model returns (WSInfer applies a softmax to it, so zoo models return logits).",
)
@click.option(
    "--parity-slide",
    type=click.Path(path_type=Path),
    default=None,
    help="Slide the parity tiles are cut from [default: the bundled sample slide].",
)
@click.option(
    "--parity-tiles",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tiles compared, TorchScript vs onnxruntime.",
)
@click.option(
    "--tolerance",
    type=_POSITIVE,
    default=1e-4,
    show_default=True,
    help="Largest accepted probability difference, TorchScript vs onnxruntime.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing NAME.onnx and NAME.json.")
def import_model(model_dir: Path, out: Path, **kw: Any) -> None:
    """Convert the WSInfer model in MODEL_DIR (config.json + torchscript_model.pt) to ONNX with a card.

    Needs torch (pip install 'wsi-pipeline[train]'); scoring with the result does not.
    """  # fmt: skip

    def body() -> int:
        import shlex

        from wsi_pipeline.inference.importer import import_wsinfer

        rep = import_wsinfer(model_dir, out, command=shlex.join(["wsi-infer", *sys.argv[1:]]), **kw)
        c = rep.card
        click.echo(
            f"{model_dir}: imported {c['architecture']['name']} ({len(c['classes'])} classes "
            f"{', '.join(c['classes'])}; positive {c['positive_class']}; output {c['output']['kind']}), "
            f"{c['input']['size_px']} px tiles at {c['mpp']:g} um/px; parity max |TorchScript - "
            f"onnxruntime| {rep.parity_max_abs_diff:.2g} (probabilities), "
            f"{rep.parity_output_max_abs_diff:.2g} (raw output) on {rep.parity_source} -> {rep.onnx_path}, "
            f"{rep.card_path}" + "".join(f" (note: {n})" for n in rep.notes)
        )
        return 0

    _run_guarded(body)


@main.command("check-model")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--slide",
    type=click.Path(path_type=Path),
    default=None,
    help="Slide the test tile is cut from [default: the bundled sample, else a synthetic tile].",
)
@_device_options(
    "cpu",
    "Also run tiles on this device as a run would (precision, I/O binding) and compare with the CPU.",
    "Precision for --device (auto: fp16 on a GPU where the card allows it).",
)
def check_model_cmd(model: Path, slide: Path | None, device: str, precision: str) -> None:
    """Check MODEL's card against its ONNX graph and run one tile through it (one-line verdict);
    with --device cuda, also check the GPU install against the CPU."""

    def body() -> int:
        from wsi_pipeline.inference.check import check_model

        click.echo(check_model(model, slide=slide, device=device, precision=precision).line())
        return 0

    _run_guarded(body)


@main.command("model-schema")
def model_schema() -> None:
    """Print the model card's published JSON Schema (draft 2020-12)."""

    def body() -> int:
        from importlib import resources

        from wsi_pipeline.inference import card

        text = resources.files(card.__package__).joinpath(card.SCHEMA_FILE).read_text(encoding="utf-8")
        click.echo(text, nl=not text.endswith("\n"))
        return 0

    _run_guarded(body)
