"""The commands on images and models: reconstruct, the readouts (one command per registered readout), eval-zeroshot, info."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import as_dict
from ..config.choices import positive_int
from ..io.files import check_output_folder, image_files
from ..readouts import READOUTS
from .common import CHECKPOINT_HELP, _add_device, _add_raw_weights, _check_checkpoint, _check_mask_ratio, _load_model


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="masked input and reconstruction of images, side by side")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads) or folders of them")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="folder for the PNG figures")
    p.add_argument("--mask-ratio", type=float, default=None, help="override the model's mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    _add_device(p)
    _add_raw_weights(p)
    p.set_defaults(func=cmd_reconstruct)


def _image_command_inputs(args) -> list[str]:
    """The checks of a command that reads images and writes figures, before anything heavy is imported."""
    _check_mask_ratio(args.mask_ratio)
    _check_checkpoint(args.checkpoint)
    images = image_files(args.images)
    check_output_folder(args.out)
    return images


def cmd_reconstruct(args) -> int:
    images = _image_command_inputs(args)
    import torch

    from ..data import load_images
    from ..model import masking_noise
    from ..viz.figures import save_reconstruction_figure

    model, mcfg, state = _load_model(args)
    imgs = torch.stack(load_images(images, mcfg.img_size)).to(args.device)
    out = Path(args.out)
    for i, path in enumerate(images):
        noise = masking_noise(args.seed, i, 1, mcfg.num_patches).to(args.device)
        fig = save_reconstruction_figure(model, imgs[i : i + 1], out / f"{Path(path).stem}_reconstruction.png", noise,
                                         mask_ratio=args.mask_ratio)
        print(fig)
    return 0


def add_readouts(sub) -> None:
    """One command per registered readout (gmae.readouts: names, help and flags are read without torch)."""
    for readout in READOUTS.values():
        p = sub.add_parser(readout.name, help=f"zero-shot {readout.summary} (PNG per image)")
        p.add_argument("images", nargs="+", help="image files (any format Pillow reads) or folders of them; the "
                       "shorter side is resized to the model's input size and the centre square is cropped")
        p.add_argument("--checkpoint", required=True, help=f"GMAE model: {CHECKPOINT_HELP}")
        p.add_argument("--out", required=True, help=f"folder for the PNG figures (NAME_{readout.name}.png)")
        p.add_argument("--mask-ratio", type=float, default=0.0,
                       help="patches hidden from the encoder (default 0: it sees the whole image)")
        _add_device(p)
        _add_raw_weights(p)
        for flag in readout.flags:
            p.add_argument(*flag.names, **flag.options)
        p.set_defaults(func=cmd_readout, readout=readout.name)


def _report_collapse(collapse: dict | None) -> None:
    """The collapse guard of the readout commands and eval-zeroshot: one line on stderr (above any progress
    bar) when the depths of the Gaussians read have collapsed (gmae.readouts.core.depth_collapse)."""
    from ..readouts.core import collapse_message
    from ..io.runs import say

    message = collapse_message(collapse) if collapse else None
    if message:
        say(message)


def cmd_readout(args) -> int:
    images = _image_command_inputs(args)
    from ..data import load_images
    from ..readouts.core import Canvas, depth_collapse, gaussians_of

    readout = READOUTS[args.readout]
    model, mcfg, state = _load_model(args)
    canvas = Canvas.of(model)
    out = Path(args.out)
    read = []
    for path, img in zip(images, load_images(images, mcfg.img_size)):  # every input read before any figure
        img = img.to(args.device)
        g = gaussians_of(model, img[None], args.mask_ratio)
        read.append(g)
        print(readout.save(img, readout.compute(g, canvas, args), out / f"{Path(path).stem}_{readout.name}.png"))
    _report_collapse(depth_collapse(read, mcfg))
    _report_layout(model, state)
    return 0


def _report_layout(model, state) -> None:
    """The layout guard of the readout commands and eval-zeroshot: one line on stderr when the model's geometry does
    not follow the image (gmae.readouts.layout.judge_layout), measured on held-out images of its run's data."""
    from ..io.checkpoint import configs_of
    from ..evaluate.zeroshot import checkpoint_layout
    from ..readouts.layout import layout_message
    from ..io.runs import say

    layout = checkpoint_layout(model, configs_of(state)[1], fidelity_too=False)["layout"]
    message = layout_message(layout)
    if message:
        say(f"{message} (measured on {layout['source']})")


def add_eval_zeroshot(sub) -> None:
    p = sub.add_parser("eval-zeroshot", help="score zero-shot edges (ODS/OIS/AP) and figure-ground (IoU) "
                       "against ground truth, with Sobel/Canny/ellipse baselines")
    p.add_argument("--checkpoint", required=True, help=f"GMAE model: {CHECKPOINT_HELP}")
    p.add_argument("--data", default="deadleaves",
                   help="deadleaves (default; generated, exact truth), sprites (1-4 plain shapes, exact truth), "
                   "bsds:ROOT (BSDS500 layout, test split) "
                   "or masks:ROOT (ROOT/images + same-named binary PNGs in ROOT/masks)")
    p.add_argument("--num-images", type=positive_int, default=None,
                   help="score only the first N images (deadleaves, sprites default: 200)")
    p.add_argument("--random-init", action="store_true",
                   help="score the checkpoint's architecture at initialisation (its run's seed) instead")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="patches hidden from the encoder (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    _add_device(p)
    _add_raw_weights(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval_zeroshot)


def cmd_eval_zeroshot(args) -> int:
    _check_mask_ratio(args.mask_ratio)
    _check_checkpoint(args.checkpoint)
    from ..evaluate.zeroshot import evaluate_zeroshot, format_scores

    model, _, state = _load_model(args, initial=args.random_init)
    results = evaluate_zeroshot(model, args.data, args.num_images, args.batch_size, args.mask_ratio,
                                progress=not args.json)
    results.update(checkpoint=str(args.checkpoint), random_init=args.random_init, weights=state["weights"])
    _report_collapse(results["collapse"])
    if results["layout"] is not None:
        from ..readouts.layout import layout_message
        from ..io.runs import say

        message = layout_message(results["layout"])
        if message:
            say(f"{message} (measured on the first {results['layout']['num_images']} images)")
    label = "gmae (init)" if args.random_init else "gmae"
    print(json.dumps(results) if args.json else format_scores(results, label))
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="config, step and parameter counts of a checkpoint, whether its depths have "
                       "collapsed and its layout follows the image (measured on a few held-out images of its run's "
                       "data), and the PSNR of its full renders against the flat mean colour")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    _add_raw_weights(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    _check_checkpoint(args.checkpoint)
    from ..io.checkpoint import configs_of
    from ..model import count_parameters
    from ..io.loader import load

    model, mcfg, state = load(args.checkpoint, "model", raw=args.raw_weights)
    _, tcfg = configs_of(state)
    encoder = count_parameters(model.encoder)
    total = count_parameters(model)
    collapse, geometry = None, {"layout": None, "fidelity": None}
    if mcfg.model == "gmae":
        from ..evaluate.zeroshot import checkpoint_collapse, checkpoint_layout

        collapse = checkpoint_collapse(model, tcfg, args.checkpoint)
        geometry = checkpoint_layout(model, tcfg)
    info = {
        "checkpoint": str(args.checkpoint), "step": state["step"], "weights": state["weights"],
        "parameters": {"encoder": encoder, "decoder": total - encoder, "total": total},
        "collapse": collapse, **geometry, "model": as_dict(mcfg), "train": None if tcfg is None else as_dict(tcfg),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['checkpoint']}: {mcfg.model} at step {info['step']}, {state['weights']} weights")
    print(f"parameters: encoder {encoder:,}  decoder {total - encoder:,}  total {total:,}")
    if collapse is not None:
        from ..evaluate.zeroshot import collapse_figures

        print(f"depth: {collapse_figures(collapse)}\n  measured on {collapse['source']}")
    if info["layout"] is not None:
        from ..evaluate.zeroshot import fidelity_line, layout_line

        print(f"layout: {layout_line(info['layout'])}\n  measured on {info['layout']['source']}")
        print(f"fidelity (PSNR of the full render at mask 0 vs each image's flat mean colour): "
              f"{fidelity_line(info['fidelity'])}")
    for section in ("model", "train"):
        if info[section] is None:
            print(f"{section}: not stored (an export holds the model only)")
            continue
        print(f"{section}:")
        for key, value in info[section].items():
            print(f"  {key}: {value}")
    return 0
