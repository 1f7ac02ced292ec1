"""Model and training settings: the dataclasses and the named presets.

`ModelConfig` is everything needed to rebuild a model (it is stored in every
checkpoint); `TrainConfig` is everything about one pre-training run,
`FinetuneConfig` about one fine-tuning run, `ProbeConfig` about one probe. Each
field says here, once, how the command line sets it (`setting`: help, type,
choices, citation) or why it does not (`no_flag`); gmae.cli.flags builds the
flags of `gmae pretrain`, `finetune` and `probe` from that, so a new setting is a
field here plus its use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from ..errors import GMAEError
from .choices import (
    CHECKPOINT_HELP, DEVICE_HELP, ENCODER_NORM_HELP, EXTRACTION_BATCH, LABELLED_DATA_HELP, PROBE_DEFAULTS,
    PROBE_PROTOCOLS, RAW_WEIGHTS_HELP, SCENE_IMAGES, STOP_GRACE_HELP, DIST_TIMEOUT_HELP, WORKERS_HELP,
    background_colour, parse_workers, positive_int, workers,
)


# ----- one place per setting: each config field carries its command-line flag's description, and gmae.cli.flags
# builds the flags of `gmae pretrain`, `finetune` and `probe` from it (tests/test_flags.py keeps the two matched).
def setting(default, *, help: str, flags: tuple[str, ...] | None = None, type=None, choices=None, metavar=None,
            negatable: bool = False, flag_default: bool = False, group: str | None = None, cite: str | None = None):
    """A config field with a flag. help: its help text ("{default}" is replaced by the field's default); flags: its
    option strings (default --the-field-name); type, choices, metavar: argparse's (type defaults to the field's
    annotation: int, float, or float pairs for a tuple; a bool is an on/off switch, --no-NAME too with `negatable`);
    flag_default: the flag's own default is the field's (otherwise None: a value not typed is the preset's or the
    recipe's, else the field's); group: the --help section it is listed in; cite: where the default comes from."""
    meta = dict(help=help, flags=flags, type=type, choices=choices, metavar=metavar, negatable=negatable,
                flag_default=flag_default, group=group, cite=cite)
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v not in (None, False)})


def no_flag(default, why: str):
    """A config field that deliberately has no command-line flag, and why."""
    return dataclasses.field(default=default, metadata={"no_flag": why})


def own_flag(default, flag: str, why: str):
    """A config field whose flag `flag` the command writes itself (gmae.cli), and why it is not generated."""
    return dataclasses.field(default=default, metadata={"own_flag": flag, "why": why})


# Citations name MAE's files at facebookresearch/mae@efb2a80 and the GMAE authors' code at tekotan/video-gmae@c630810,
# as gmae.config.recipes does.
AUTHORS_LR = "tekotan/video-gmae@c630810 configs/gmae_ema.yaml line 138 (lr: 0.001, scaled by batch / 256)"
BY_PRESET = "set by --preset (PRESET_SHAPE: the presets are MAE's ViT shapes)"
RECIPE_FLAG = "--recipe sets the other flags' defaults before the command line is parsed (gmae.cli.common._add_recipe)"
PRECISIONS = ("auto", "fp32", "bf16")
BAD_IMAGE_ACTIONS = ("skip", "error")
# The --help section of fine-tuning's MAE regularisers.
TIMM_GROUP = "MAE's regularisers, from timm (off by default; MAE's ViT-B value in brackets)"

MODELS = ("gmae", "mae")
LOSSES = ("masked", "all", "masked_normpix")
# The cameras of gmae.render.camera.CAMERAS (named here so that parsing a command
# line needs no torch; a test keeps the two lists equal).
CAMERAS = ("orthographic", "authors", "pinhole")
# The cameras whose z changes a Gaussian's on-screen size (`Camera.depth_through_projection`; a test keeps
# the two equal). With them z must stay bounded: see ModelConfig.validate.
SIZE_FROM_DEPTH_CAMERAS = ("authors", "pinhole")
# How the head's raw depth becomes z: "bounded" 2·(sigmoid − ½) in (−1, 1) (the
# authors'), "linear" z = raw (never saturates; only the order matters, so only
# with the orthographic camera: see ModelConfig.validate), or "centred" 2·(sigmoid(raw
# − the image's mean raw) − ½): bounded like the authors', but only depths relative to
# the image's other Gaussians are learned, so no common drift can push them all onto a
# limit together (docs/reports/depth.md, "the regime map").
DEPTH_PARAMS = ("bounded", "linear", "centred")
# Depth learning signal from the rasterizer: "off" (3DGS compositing: depth only
# sorts), "swap" (the same compositing, plus the depth-order gradient of the
# relaxed swap of neighbours) or "weighted" (order-free weighted compositing whose
# depth weights exp(-z/tau) are differentiable; the readouts render the same way).
DEPTH_GRADS = ("off", "swap", "weighted")
# Where the m Gaussians of one query token sit (`gaussians_per_query` > 1): "absolute", each
# position its own, exactly as one Gaussian per token; "anchored", x and y an offset of at most
# `anchor_spread` around a per-token anchor (z stays each Gaussian's own; see gmae.model.gmae).
# Anchored trained better at equal steps (docs/reports/gaussians_per_query.md), so it is the default; with
# m = 1 both are the same model, one Gaussian per query.
POSITION_PARAMS = ("absolute", "anchored")
# How the encoder normalises its [0, 1] input (ModelConfig.input_norm): "none" (the default: the raw image) or
# "imagenet" (MAE's: (x - mean) / std with ImageNet's statistics, MAE main_pretrain.py line 127). Only the
# encoder's input changes: the reconstruction target stays the [0, 1] image (GMAE's colours are sigmoids).
INPUT_NORMS = ("none", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resampling of the random resized crop (TrainConfig.interpolation); bicubic is MAE's (main_pretrain.py line 124).
INTERPOLATIONS = ("bicubic", "bilinear")
# The GMAE authors' code's choices (docs/fidelity.md cites each), each a ModelConfig option whose default is gmae's own:
# how the head's 4 rotation numbers become a unit quaternion (ModelConfig.rotation_param): "normalize" (gmae's:
# the 4-vector divided by its norm), "uniform" (the authors': 3 sigmoids u1, u2, u3 through Shoemake's
# uniform-random-rotation formula, its components taken in the order the authors' code builds them and legacy gsplat
# reads them, the first as w: tekotan/video-gmae models_mae.py lines 555-564, gsplat v0.1.1 helpers.cuh line 144)
# or "uniform-scalar-last" (the same formula read as Shoemake wrote it, (x, y, z, w): another rotation for the
# same u; what gmae's "uniform" was before it followed the authors' order, kept so that those checkpoints
# rebuild the model they were). Both uniform maps give uniformly distributed rotations; the 4th number is unused.
ROTATION_PARAMS = ("normalize", "uniform", "uniform-scalar-last")
# Where each query token's Gaussians are placed (ModelConfig.position_source): "head" (the authors': x, y are numbers
# of the linear head, like colour), "pointer" (an attention-weighted place among the visible patches' centres,
# from the decoder's outputs at the query and at the patches, plus an offset of at most a patch from the head:
# a pointer into the image, see GMAE.point) or "slots" (slot attention: the queries compete for the visible patches,
# and each query's Gaussians sit around the mean centre of the patches it won, see GMAE.group).
POSITION_SOURCES = ("head", "pointer", "slots")
# Where a pixel's sample point is (ModelConfig.pixel_origin): "centre" (pixel i at i + 0.5 in the camera's pixel
# coordinates: gsplat >= 0.1.2 and gmae's rendering contract) or "legacy" (legacy gsplat v0.1.0/v0.1.1, the API the
# authors' code calls: ndc2pix = 0.5 W x + 0.5 + cx with pixel i sampled at i, helpers.cuh line 8 and forward.cu
# lines 275-276, so every Gaussian sits one pixel further right and down).
PIXEL_ORIGINS = ("centre", "legacy")
# Which tiles a Gaussian is listed in (ModelConfig.tile_cut): "alpha" (every tile where its alpha can reach 1/255:
# gmae's contract, nothing that counts is dropped) or "3sigma" (legacy gsplat's: the tiles its box of ceil(3 sigma)
# pixels touches, helpers.cuh line 66 and forward.cu line 118, so the tails of opaque Gaussians beyond 3 sigma that
# still reach alpha 1/255 are cut at tile borders). Backends torch, cpu and triton honour both; gsplat "alpha" only.
TILE_CUTS = ("alpha", "3sigma")
# How the Gaussian head's weights start (ModelConfig.head_init): "xavier" (MAE's init of every linear, gmae's) or
# "torch" (PyTorch's nn.Linear default, U(+-1/sqrt(d)): the authors call initialize_weights() before they create the
# head, so it keeps the default; models_mae.py lines 306 and 333-335).
HEAD_INITS = ("xavier", "torch")
# How the patch embedding's bias starts (ModelConfig.patch_bias_init): "zero" (gmae's) or "torch" (PyTorch's
# nn.Conv2d default, which MAE and the authors keep: their initialize_weights re-draws only the weight).
PATCH_BIAS_INITS = ("zero", "torch")
# The query tokens' own embeddings at initialisation (ModelConfig.query_init): "normal" (gmae's N(0, 1), see
# QUERY_INIT_STD in gmae.model.gmae) or "uniform" (the authors': U[0, 1)).
QUERY_INITS = ("normal", "uniform")


@dataclass
class ModelConfig:
    model: str = setting("gmae", choices=MODELS, help='gmae (default) or the mae baseline')
    img_size: int = setting(64, type=positive_int, help="input size (default: the preset's)")
    patch_size: int = setting(8, type=positive_int, help="patch size (default: the preset's)")
    in_chans: int = no_flag(3, "every data source loads RGB images")
    # ViT encoder
    embed_dim: int = no_flag(192, BY_PRESET)
    depth: int = no_flag(6, BY_PRESET)
    num_heads: int = no_flag(3, BY_PRESET)
    mlp_ratio: float = no_flag(4.0, "4 in every preset, as in every ViT of MAE")
    # light decoder
    decoder_embed_dim: int = no_flag(128, BY_PRESET)
    decoder_depth: int = no_flag(2, BY_PRESET)
    decoder_num_heads: int = no_flag(4, BY_PRESET)
    # pre-training objective
    mask_ratio: float = setting(0.75, help=
        "fraction of patches masked (tiny: 0.25; the other presets: 0.75, the paper's)")
    loss: str = setting("masked", choices=LOSSES, help=
        "masked (the paper's; default of every preset but tiny), all (tiny's: every pixel), masked_normpix")
    # GMAE only
    num_gaussians: int = setting(256, flags=("--num-gaussians", "-k"), type=positive_int, help=
        'k Gaussians per image, whatever --gaussians-per-query (tiny: 128, others 256)')
    # m: Gaussians each query token emits; the decoder runs k / m query tokens (m must divide k)
    gaussians_per_query: int = setting(1, type=positive_int, help=
        'm Gaussians emitted by each query token: the decoder runs k / m query tokens, so m must divide k '
        '(default 1; e.g. -k 4096 --gaussians-per-query 16: 256 tokens, 4096 Gaussians)')
    position_param: str = setting("anchored", choices=POSITION_PARAMS, help=
        "with m > 1, where a token's m Gaussians sit: anchored (default; x, y offsets of at most 2/sqrt(k/m) "
        'around a per-token anchor; trains better) or absolute (each its own position)')
    max_scale: float = setting(1.0, help='c, the largest Gaussian scale (default 1.0)')
    max_opacity: float = setting(1.0, help=
        "opacity = MAX * sigmoid (default 1, the authors'); above 1 a Gaussian saturates at alpha --max-alpha "
        'over a core and has a sharp rim (a flat-topped blob)')
    opacity_reg: float = setting(0.0, help=
        'add this x mean opacity (relative to --max-opacity) to the loss: an economy prior for fewer, larger '
        'Gaussians (default 0)')
    background: tuple[float, float, float] = setting((1.0, 1.0, 1.0), type=background_colour, help=
        'render background: white (default), black, grey or R,G,B')
    render_backend: str = setting("auto", help=
        'renderer backend: auto (default; triton, else gsplat, on CUDA), triton, gsplat, cpu, torch')
    camera: str = setting("authors", choices=CAMERAS, help=
        "projection of the Gaussians: orthographic (z only sorts), authors (the GMAE authors' legacy-gsplat "
        'camera: z changes on-screen size), pinhole (true perspective)')
    depth_param: str = setting("bounded", choices=DEPTH_PARAMS, help=
        "z from the head: bounded 2*(sigmoid-0.5) (the authors'), centred (the same of the raw depth minus the "
        "image's mean: no common drift onto a limit) or linear (never saturates; --camera orthographic only)")
    depth_grad: str = setting("off", choices=DEPTH_GRADS, help=
        'how depth learns: off (3DGS compositing; depth only sorts), swap (the same compositing plus the '
        "rasterizer's depth-order gradient: z learns which of two overlapping Gaussians should be in front; "
        'backends torch and cpu) or weighted (order-free weighted compositing with depth weights exp(-z/tau); '
        'backend torch; the readouts render the same way)')
    depth_tau: float = setting(0.1, help=
        'temperature, in depth units, of the swap relaxation or of the weighted compositing (default 0.1)')
    # The encoder's input normalisation, see INPUT_NORMS; part of the model so that every user of a checkpoint
    # (fine-tuning, probes, readouts, export) feeds it as it was trained.
    input_norm: str = setting("none", flags=("--normalize",), choices=INPUT_NORMS, help=
        "the encoder's input: none (default: the [0, 1] image) or imagenet (MAE's mean/std, applied inside the "
        'encoder, so fine-tuning, probes, readouts and exports get it too); the reconstruction target stays the '
        '[0, 1] image')
    # --- the GMAE authors' code's choices (docs/fidelity.md); each default is gmae's own choice, so a checkpoint
    # saved without them reads as what it was (no LEGACY_VALUES needed).
    rotation_param: str = setting("normalize", choices=ROTATION_PARAMS, help=
        "the Gaussians' rotation from the head: normalize (default; its 4 numbers divided by their norm), uniform"
        " (the authors': 3 sigmoids through Shoemake's uniform-rotation formula, components in the authors' "
        'order, the first, sqrt(1-u1) sin 2 pi u2, as w: tekotan/video-gmae models_mae.py lines 555-564, gsplat '
        'v0.1.1 helpers.cuh line 144; the 4th number is unused) or uniform-scalar-last (the same formula read (x,'
        ' y, z, w))')
    query_init: str = setting("normal", choices=QUERY_INITS, help=
        "the query tokens' own embeddings at the start: normal (default; N(0, 1)) or uniform (the authors': U[0, "
        '1))')
    # Whether the Gaussian head has a bias. The bias also sets each Gaussian's starting size and opacity (GMAE.build_head);
    # without it they start around c·sigmoid(0) = c/2 and max_opacity/2 (the authors' bias-free head).
    head_bias: bool = setting(True, negatable=True, help=
        'whether the Gaussian head has a bias (default: yes). Its bias also sets the starting size (half of c = '
        "1's largest std, / sqrt(m)) and opacity (1/2); --no-head-bias (the authors') starts every scale around c"
        ' x sigmoid(0) = c/2 and every opacity around max-opacity/2')
    max_alpha: float = setting(0.99, help=
        "the renderer's clamp on each Gaussian's alpha, in (0, 1] (default 0.99, 3DGS's; the authors' 0.999); "
        'training and the readouts render with it')
    # --- what places the Gaussians (docs/reports/layout.md); each default is the behaviour
    # from before it. position_gain: x, y = 2·(sigmoid(gain·raw) − ½), a gain g makes positions g times as fast to
    # learn; query_noise: std of Gaussian noise added to each query embedding, per image, while training;
    # position_source: see POSITION_SOURCES.
    position_gain: float = setting(1.0, help=
        'x, y = 2 (sigmoid(GAIN x raw) - 1/2): positions GAIN times as sensitive to the head, and as fast to '
        'learn under Adam (default 1)')
    query_noise: float = setting(0.0, help=
        'std of Gaussian noise added to every query embedding, per image, while training (default 0)')
    position_source: str = setting("head", choices=POSITION_SOURCES, help=
        "what places each query's Gaussians: head (the paper's presets; x, y are numbers of the linear head, the "
        "authors'), pointer (tiny's default: an attention-weighted place among the visible patches, from the "
        "decoder's outputs, plus an offset of at most a patch: a pointer into the image) or slots (slot "
        'attention: the queries compete for the visible patches and sit around the centre of those they win)')
    pixel_origin: str = setting("centre", choices=PIXEL_ORIGINS, help=
        "where pixel i is sampled: centre (default; at i + 0.5, gsplat >= 0.1.2's) or legacy (legacy gsplat "
        "v0.1.0/v0.1.1's, which the authors' code calls: ndc2pix = 0.5 W x + 0.5 + cx with pixel i at i, "
        'helpers.cuh line 8: every Gaussian one pixel further right and down)')
    tile_cut: str = setting("alpha", choices=TILE_CUTS, help=
        'which tiles draw a Gaussian: alpha (default; every tile where its alpha can reach 1/255) or 3sigma '
        "(legacy gsplat's, as the authors' model renders: only the tiles its ceil(3 sigma) box touches, "
        'helpers.cuh line 66; backends torch, cpu, triton)')
    head_init: str = setting("xavier", choices=HEAD_INITS, help=
        "the Gaussian head's starting weights: xavier (default; MAE's init of every linear) or torch (nn.Linear's"
        " own U(+-1/sqrt(d)), as the authors' head keeps it: models_mae.py lines 306 and 333-335 create it after "
        'initialize_weights())')
    patch_bias_init: str = setting("zero", choices=PATCH_BIAS_INITS, help=
        "the patch embedding's starting bias: zero (default) or torch (nn.Conv2d's own, kept by MAE and the "
        'authors, whose init re-draws only the weight: models_mae.py lines 357-359)')

    def __post_init__(self) -> None:
        self.background = tuple(float(v) for v in self.background)
        self.validate()

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_queries(self) -> int:
        """q, the decoder's query tokens: k Gaussians = q tokens x m Gaussians each."""
        return self.num_gaussians // self.gaussians_per_query

    def validate(self) -> None:
        """Raise GMAEError naming the first impossible setting."""
        if self.model not in MODELS:
            raise GMAEError(f"model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if self.loss not in LOSSES:
            raise GMAEError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.patch_size <= 0 or self.img_size <= 0 or self.img_size % self.patch_size:
            raise GMAEError(
                f"image size {self.img_size} must be a positive multiple of the patch size {self.patch_size}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise GMAEError(f"mask ratio must be in [0, 1) so that some patches stay visible; got {self.mask_ratio}")
        if self.num_gaussians < 1:
            raise GMAEError(f"number of Gaussians must be at least 1; got {self.num_gaussians}")
        if self.gaussians_per_query < 1 or self.num_gaussians % self.gaussians_per_query:
            raise GMAEError(f"gaussians-per-query {self.gaussians_per_query} must be at least 1 and divide the number "
                            f"of Gaussians k = {self.num_gaussians} (k Gaussians = k / m query tokens x m each)")
        if not self.max_scale > 0:
            raise GMAEError(f"max scale c must be positive; got {self.max_scale}")
        if not self.opacity_reg >= 0.0:
            raise GMAEError(f"opacity-reg must be >= 0; got {self.opacity_reg}")
        if not self.max_opacity >= 1.0:
            raise GMAEError(f"max opacity must be at least 1 (1: opacity = sigmoid, the authors'); got {self.max_opacity}")
        for name, allowed in (("camera", CAMERAS), ("depth_param", DEPTH_PARAMS), ("depth_grad", DEPTH_GRADS),
                              ("position_param", POSITION_PARAMS), ("input_norm", INPUT_NORMS),
                              ("rotation_param", ROTATION_PARAMS), ("query_init", QUERY_INITS),
                              ("pixel_origin", PIXEL_ORIGINS), ("tile_cut", TILE_CUTS), ("head_init", HEAD_INITS),
                              ("position_source", POSITION_SOURCES),
                              ("patch_bias_init", PATCH_BIAS_INITS)):
            if getattr(self, name) not in allowed:
                flag = {"input_norm": "normalize"}.get(name, name.replace("_", "-"))  # named as on the command line
                raise GMAEError(f"{flag} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.depth_param == "linear" and self.camera in SIZE_FROM_DEPTH_CAMERAS:
            # Measured (docs/reports/depth.md, "the regime map"): z is then an unbounded size knob (size ~ 8 / (z + 8)), the
            # Gaussians that want to be larger run z towards the camera plane at -8 and training diverges (loss
            # 0.047 at step 100, 0.32 at the end, worse than the 0.23 at initialisation).
            raise GMAEError(f"depth-param linear needs --camera orthographic: with the {self.camera} camera z sets "
                            "on-screen size, and unbounded z runs into the camera plane (training diverges); "
                            "use --depth-param bounded")
        if not self.position_gain > 0 or not self.query_noise >= 0:
            raise GMAEError(f"position-gain must be > 0 and query-noise >= 0; got {self.position_gain}, "
                            f"{self.query_noise}")
        if not self.depth_tau > 0:
            raise GMAEError(f"depth-tau must be positive; got {self.depth_tau}")
        if not isinstance(self.head_bias, bool):
            raise GMAEError(f"head-bias must be true or false; got {self.head_bias!r}")
        # (0, 1]: alpha 0 would draw nothing; above 1 a pixel's transmittance 1 - alpha turns negative.
        if isinstance(self.max_alpha, bool) or not isinstance(self.max_alpha, (int, float)) \
                or not 0.0 < self.max_alpha <= 1.0:
            raise GMAEError(f"max-alpha must be in (0, 1] (0.99: 3DGS's, the default; 0.999: the authors'); "
                            f"got {self.max_alpha!r}")
        if len(self.background) != self.in_chans:
            raise GMAEError(f"background needs {self.in_chans} values; got {self.background}")
        for name in ("embed_dim", "decoder_embed_dim"):
            dim, heads = getattr(self, name), getattr(self, name.replace("embed_dim", "num_heads"))
            if dim % heads:
                raise GMAEError(f"{name} {dim} must be divisible by its number of heads {heads}")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise GMAEError("embedding widths must be multiples of 4 (2D sin-cos position embedding)")


@dataclass
class TrainConfig:
    data: str = setting("deadleaves", flag_default=True, help=
        "deadleaves (default), sprites (1-4 plain shapes), photos, digits (scikit-learn's, train split), or a "
        'folder of images (ImageNet layout or flat)')
    steps: int = setting(1000, type=positive_int, help='optimizer steps (tiny: 1200)')
    batch_size: int = setting(64, type=positive_int, help='global batch size (tiny: 16)')
    blr: float = setting(1e-3,
        cite=AUTHORS_LR, help='base learning rate; lr = blr * batch / 256 (tiny: 1.6e-2, others 1e-3)')
    warmup_steps: int = setting(100, help='linear warmup steps (tiny: 50)')
    min_lr: float = no_flag(0.0, "the cosine schedule ends at 0, as MAE's pre-training (main_pretrain.py --min_lr 0)")
    weight_decay: float = setting(0.05,
        cite="MAE PRETRAIN.md line 15 (--weight_decay 0.05)", help='AdamW weight decay (default 0.05)')
    betas: tuple[float, float] = setting((0.9, 0.95), metavar=("B1", "B2"),
        cite="MAE main_pretrain.py line 180 (AdamW betas=(0.9, 0.95))", help=
        "AdamW betas (default 0.9 0.95, MAE's)")
    seed: int = setting(0, flag_default=True, help="random seed of the run (default {default})")
    device: str = setting("auto", help=DEVICE_HELP)
    out: str = setting("runs/pretrain", flag_default=True, help=
        'output folder for checkpoints, metrics and figures (default {default})')
    checkpoint_every: int = setting(500, type=positive_int, help='steps between checkpoints (tiny: 400)')
    log_every: int = no_flag(1, "every step is logged to metrics.jsonl; a longer interval is for the Python API")
    # DataLoader processes: "auto" (gmae.runtime.threads.resolve_workers: some for an image folder on a GPU, else 0)
    # or a number; batches are the same with any number (gmae.data.stream)
    num_workers: int | str = setting("auto", type=workers, metavar="N|auto", help=WORKERS_HELP)
    keep_checkpoints: int = setting(3, type=positive_int, help='newest checkpoints kept (default {default})')
    accum_steps: int = setting(1, type=positive_int, flag_default=True, help=
        "split each process's batch into this many micro-batches (same result, less memory)")
    clip_grad: float = setting(0.0, flag_default=True, help='max gradient norm (default 0: no clipping)')
    precision: str = setting("auto", choices=PRECISIONS, flag_default=True, help=
        'auto (default): bf16 autocast on CUDA, fp32 on CPU')
    compile: bool = setting(False, help='torch.compile the model')
    max_bad_steps: int = setting(10, type=positive_int, help=
        'non-finite losses in a row (each step skipped) before stopping (default {default})')
    on_bad_image: str = setting("skip", choices=BAD_IMAGE_ACTIONS, flag_default=True, help=
        'an unreadable image during training: skip it (logged and counted, default) or stop')
    init_encoder: str = setting("", metavar="FILE", flag_default=True, help=
        'start the encoder from FILE: a gmae checkpoint or export, or a timm / MAE ViT checkpoint of the same '
        'shape (fresh runs only)')
    ema: float = setting(0.0, metavar="DECAY", help=
        'also keep an fp32 exponential moving average of the weights with this decay, saved in the checkpoints '
        "and used by the commands that read them (--raw-weights: not); e.g. 0.999, the authors' (default 0: none)")
    # ---- the online probe (gmae.model.online_probe).
    # A linear classifier per encoder block on the batch's labels, on detached features: the model trains exactly
    # as without it (gmae.model.online_probe); needs labelled data (gmae.data.sourcelabels).
    online_probe: bool = setting(False, help=
        "also train a linear probe on every encoder block's visible tokens, detached (the model trains exactly as"
        " without it), and log each block's train-batch accuracy and loss as online_probe/acc_blockI, "
        'online_probe/loss_blockI; needs labelled --data: digits, sprites, deadleaves or a folder of class '
        'sub-folders')
    # --- recipes (gmae.config.recipes) and the settings they need; each default is the run without a recipe.
    recipe: str = own_flag("", "--recipe", RECIPE_FLAG)  # a record of the recipe the run started from ("" = none)
    # The run's length in epochs of the data set (None: `steps` is the length). Made concrete by `resolved` once
    # the data set's size and the processes are known: `steps` is then the steps it came to.
    epochs: float | None = setting(None, help=
        'run length in epochs of the data set (an image folder or digits; not with --steps): steps = round(EPOCHS'
        ' x floor(images / batch)), batch being the global (effective) batch')
    warmup_epochs: float | None = setting(None, help=
        'linear warmup in epochs, as --epochs converts them (not with --warmup-steps)')
    # Per-process micro-batch (0: none; accum_steps splits the batch). With it, batch_size is the effective batch
    # and accum_steps = batch_size / (processes x micro_batch), as MAE's accum_iter (PRETRAIN.md line 18).
    micro_batch: int = setting(0, type=positive_int, help=
        'per-process micro-batch: --batch-size is then the effective batch, reached by gradient accumulation over'
        " batch / (processes x micro-batch) micro-batches, as MAE's accum_iter (e.g. --batch-size 4096 "
        '--micro-batch 64; not with --accum-steps)')
    crop_scale: tuple[float, float] = setting((0.2, 1.0), metavar=("MIN", "MAX"),
        cite="MAE main_pretrain.py line 124 (RandomResizedCrop scale=(0.2, 1.0))", help=
        "random resized crop's area range for image folders and photos (default 0.2 1, MAE's)")
    interpolation: str = setting("bicubic", choices=INTERPOLATIONS,
        cite="MAE main_pretrain.py line 124 (interpolation=3, bicubic)", help=
        "random resized crop's resampling for image folders and photos (default bicubic, MAE's)")
    # Steps between measurements of whether the Gaussians follow the image (gmae.readouts.layout: the layout figures
    # and the full-image PSNR on a fixed held-out batch, logged in metrics.jsonl); 0 = never. GMAE only.
    layout_every: int = setting(100, metavar="STEPS", help=
        'every STEPS steps (and at the last), log whether the Gaussians follow the image: the layout figures '
        '(layout_spread_ratio, depth_rank_corr, edge_follow) and the full-image PSNR against the flat mean colour'
        ' (psnr_full, psnr_mean_colour) on a fixed held-out batch; 0: never (default {default})')
    # Seconds a run may take to reach its step boundary after a stop signal before it exits at once
    # (gmae.runtime.stopping.StopGuard); 0 = wait for the step however long it takes.
    stop_grace: float = setting(60.0, metavar="S", help=STOP_GRACE_HELP)
    # Under torchrun: seconds a collective may wait for the other processes before this one ends with an error
    # naming its rank (gmae.runtime.distributed.DEFAULT_TIMEOUT: torch's own 30 minutes, and why not less).
    dist_timeout: float = setting(1800.0, metavar="S", help=DIST_TIMEOUT_HELP)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self._check_recipe_settings()
        if self.precision not in PRECISIONS:
            raise GMAEError(f"precision must be auto, fp32 or bf16; got {self.precision!r}")
        if self.on_bad_image not in BAD_IMAGE_ACTIONS:
            raise GMAEError(f"on-bad-image must be skip or error; got {self.on_bad_image!r}")
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise GMAEError(f"batch size {self.batch_size} must be a multiple of accum-steps {self.accum_steps}")
        self.num_workers = parse_workers(self.num_workers)
        if self.keep_checkpoints < 1 or self.max_bad_steps < 1 or self.clip_grad < 0:
            raise GMAEError("keep-checkpoints and max-bad-steps must be >= 1 and clip-grad >= 0")
        if self.steps < 1:
            raise GMAEError(f"steps must be at least 1; got {self.steps}")
        if self.batch_size < 1:
            raise GMAEError(f"batch size must be at least 1; got {self.batch_size}")
        if not self.blr > 0:
            raise GMAEError(f"base learning rate must be positive; got {self.blr}")
        if self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise GMAEError("warmup steps must be >= 0 and checkpoint-every >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise GMAEError(f"ema decay must be in [0, 1) (0: no EMA; the authors' runs use 0.999); got {self.ema}")
        if self.stop_grace < 0:
            raise GMAEError(f"stop-grace must be >= 0 seconds (0: no limit); got {self.stop_grace}")
        if not self.dist_timeout > 0:
            raise GMAEError(f"dist-timeout must be > 0 seconds; got {self.dist_timeout}")
        if self.layout_every < 0:
            raise GMAEError(f"layout-every must be >= 0 (0: never); got {self.layout_every}")

    def _check_recipe_settings(self) -> None:
        if self.epochs is not None and not self.epochs > 0:
            raise GMAEError(f"epochs must be positive; got {self.epochs}")
        if self.warmup_epochs is not None and not self.warmup_epochs >= 0:
            raise GMAEError(f"warmup epochs must be >= 0; got {self.warmup_epochs}")
        if self.micro_batch < 0:
            raise GMAEError(f"micro-batch must be >= 1 (or 0: none); got {self.micro_batch}")
        if self.micro_batch:
            # accum_steps is then computed (`resolved`), so it is not checked against it here.
            if self.batch_size % self.micro_batch:
                raise GMAEError(f"batch size {self.batch_size} must be a multiple of the micro-batch "
                                f"{self.micro_batch} (x the number of processes)")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise GMAEError(f"crop scale must be MIN MAX with 0 < MIN <= MAX <= 1; got {self.crop_scale}")
        if self.interpolation not in INTERPOLATIONS:
            raise GMAEError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}")

    def resolved(self, num_images: int | None, world_size: int = 1) -> TrainConfig:
        """A copy with the run made concrete for a data set of `num_images` images (None: a generated source,
        which has no epochs) and `world_size` processes: `steps` and `warmup_steps` from `epochs` and
        `warmup_epochs`, `accum_steps` from `micro_batch`.

        An epoch is MAE's: the optimizer steps of one pass with the last partial batch dropped,
        floor(num_images / batch_size), batch_size being the global (effective) batch; fractional epochs round
        to the nearest step (at least 1). A data set smaller than one batch has epochs of 0 steps: refused, since a
        recipe's length in epochs means nothing there (MAE's loader would end each epoch before a step).
        """
        changes: dict = {}
        if self.micro_batch:
            per_step = world_size * self.micro_batch
            if self.batch_size % per_step:
                raise GMAEError(f"batch size {self.batch_size} must be a multiple of processes x micro-batch "
                                f"({world_size} x {self.micro_batch}); change --batch-size or --micro-batch")
            changes["accum_steps"] = self.batch_size // per_step
        if self.epochs is not None or self.warmup_epochs is not None:
            which = "--epochs" if self.epochs is not None else "--warmup-epochs"
            if num_images is None:
                raise GMAEError(f"{which} needs a data set with a size (an image folder or digits); --data "
                                f"{self.data} is generated without end: give --steps and --warmup-steps instead")
            per_epoch = num_images // self.batch_size
            if per_epoch == 0:
                raise GMAEError(f"{which} {self.epochs if self.epochs is not None else self.warmup_epochs:g}: an "
                                f"epoch of {num_images} images at batch {self.batch_size} is 0 steps (the last "
                                "partial batch is dropped, as MAE does); give a batch of at most "
                                f"{num_images} images, or the length in --steps")
            if self.epochs is not None:
                changes["steps"] = max(1, round(self.epochs * per_epoch))
            if self.warmup_epochs is not None:
                changes["warmup_steps"] = round(self.warmup_epochs * per_epoch)
        return replace(self, **changes) if changes else self


# MAE's ViT shapes; the decoder is MAE's 512 x 8 for base/large. `tiny` is sized for
# CPU pre-training (64x64 images, 8x8 patches; k = 128 Gaussians, 2 per patch, near
# the paper's 256 for 196 patches; the decoder's cost grows with k) and
# `small` sits in between. small/base/large keep the authors' Gaussians (c = 1,
# bounded z); only `tiny` has been measured out of the collapsed regime.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, num_gaussians=128,
        # Out of the collapsed regime (docs/reports/depth.md, "the regime map"): with the authors' c = 1 and bounded z,
        # every scale ends at its cap and every z at its near limit, so the readouts show the query tokens'
        # order; a larger cap leaves the scales room, and centred z removes the common drift onto a limit.
        max_scale=3.0, depth_param="centred",
        # Gaussians that follow the image (docs/reports/layout.md, "the map"): with the paper's masked loss at 75% the full
        # render of a held-out photo is worse than its flat mean colour and every image gets one fixed layout; the
        # loss on every pixel with a quarter masked renders photos 4.3 dB above the mean colour, but its layout is
        # fixed too; the pointer positions (GMAE.point) make it follow the image at 3.2 dB above the mean colour.
        # The paper's presets (small, base, large) and recipes keep the paper's masked loss and head positions.
        loss="all", mask_ratio=0.25, position_source="pointer",
    ),
    "small": dict(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, num_gaussians=256,
    ),
    "base": dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, num_gaussians=256,
    ),
    "large": dict(
        img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, num_gaussians=256,
    ),
}


# What a resumed run may change (its length, where it runs, how it loads data, how often it saves or evaluates);
# every other setting is the checkpoint's, and a command line that contradicts it is refused.
# (epochs: a new length, as steps; micro_batch: the memory of the machine it resumes on, the same result.)
PRETRAIN_RESUMABLE = ("steps", "epochs", "micro_batch", "device", "checkpoint_every", "num_workers", "keep_checkpoints",
                      "max_bad_steps", "layout_every", "stop_grace", "dist_timeout")
FINETUNE_RESUMABLE = ("steps", "device", "num_workers", "keep_checkpoints", "checkpoint_every", "eval_every",
                      "stop_grace", "accum_steps", "max_bad_steps", "dist_timeout")
DETECT_RESUMABLE = ("steps", "device", "keep_checkpoints", "checkpoint_every", "stop_grace", "max_bad_steps",
                    "dist_timeout", "evaluate")

# The fields only --preset sets: they name a checkpoint's preset (`preset_of`).
PRESET_SHAPE = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def preset_of(mcfg: ModelConfig) -> str:
    """The name of the preset whose encoder and decoder shapes `mcfg` has ("custom" if none)."""
    for name, values in PRESETS.items():
        if all(getattr(mcfg, key) == values[key] for key in PRESET_SHAPE):
            return name
    return "custom"


# Training defaults a preset recommends (anything else: TrainConfig's defaults).
# `tiny` is tuned to learn recognisable renders of dead-leaves in ~4 minutes on
# 2 CPU cores: small batches, many steps, and a base lr giving lr = 1e-3. MAE's
# large-batch lr (blr 1e-3 at batch 16 is 6e-5) leaves the renders at each
# image's mean colour for the whole run.
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(steps=1200, batch_size=16, blr=1.6e-2, warmup_steps=50, checkpoint_every=400),
}


def _with_preset(cls, table: dict, preset: str, overrides: dict):
    if preset not in PRESETS:
        raise GMAEError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(table.get(preset, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset's ModelConfig with `overrides` (None values are ignored) applied."""
    return _with_preset(ModelConfig, PRESETS, preset, overrides)


def train_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """A preset's recommended TrainConfig with `overrides` (None values are ignored) applied."""
    return _with_preset(TrainConfig, TRAIN_PRESETS, preset, overrides)


# What a field meant before it existed: a checkpoint written without it is read
# with this value (not the current default), so that it builds the model it was.
# position_param needs none: a checkpoint without it has m = 1, where both settings are the same model,
# and taking the current default keeps its config equal to a new m = 1 run's (`gmae ablate` compares them).
# rotation_param, query_init, head_bias, max_alpha, pixel_origin, tile_cut, head_init and patch_bias_init need none:
# their defaults are the behaviour from before them (but see _renamed_values).
LEGACY_VALUES: dict[type, dict] = {
    ModelConfig: {"camera": "orthographic", "depth_param": "bounded", "depth_grad": "off", "gaussians_per_query": 1,
                  "input_norm": "none"},
}


def _renamed_values(cls, values: dict) -> dict:
    """Values whose meaning changed, renamed to what they meant when the checkpoint was written.

    rotation_param "uniform" took Shoemake's components as (x, y, z, w) until pixel_origin existed (the two came
    together); since then it takes them in the authors' order, w first. A ModelConfig saved without pixel_origin
    therefore meant what is now called "uniform-scalar-last"."""
    if cls is ModelConfig and "pixel_origin" not in values and values.get("rotation_param") == "uniform":
        return {**values, "rotation_param": "uniform-scalar-last"}
    return values


def config_from_dict(cls, values: dict):
    """Rebuild a config dataclass from a checkpoint's dict, ignoring unknown keys;
    fields the dict lacks take their LEGACY_VALUES (else the default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    known = {**LEGACY_VALUES.get(cls, {}), **_renamed_values(cls, values)}
    return cls(**{k: v for k, v in known.items() if k in names})


def as_dict(cfg) -> dict:
    """Plain-Python dict (lists, not tuples) safe for json and weights_only checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# ----- fine-tuning on timm (MAE's main_finetune.py): MAE's regularisers and the pooled feature -----
#: The fine-tuning classifier's pooled feature (gmae.model.classifier): "avg", fc_norm of the patch-token mean
#: (MAE main_finetune.py lines 114-115: its default), or "cls", the encoder's final norm of the cls token.
GLOBAL_POOLS = ("avg", "cls")
#: timm.data.Mixup's modes (MAE main_finetune.py line 108): one lambda per batch, per pair, per element.
MIXUP_MODES = ("batch", "pair", "elem")
#: timm.data.RandomErasing's fills (MAE main_finetune.py line 90; MAE uses "pixel").
ERASE_MODES = ("pixel", "rand", "const")


# Fine-tuning's settings live here, beside pre-training's, so that `gmae finetune --help` needs no torch.
@dataclass
class FinetuneConfig:
    checkpoint: str = setting("", help=f"{CHECKPOINT_HELP}, or timm/MAE ViT weights (not needed with --resume)")
    data: str = setting("digits", flag_default=True, help=LABELLED_DATA_HELP)
    epochs: int = setting(5, type=positive_int, flag_default=True, help='epochs (default {default})')
    steps: int = setting(0, type=positive_int, help='optimizer steps (overrides --epochs)')
    batch_size: int = setting(32, type=positive_int, flag_default=True, help='batch size (default {default})')
    blr: float = setting(8e-3, flag_default=True, help='base lr; lr = blr * batch / 256 (default {default})')
    min_lr: float = no_flag(1e-6, "MAE main_finetune.py's default (--min_lr 1e-6), which no recipe changes")
    warmup_steps: int = setting(-1, help='linear warmup steps (default: one epoch)')
    weight_decay: float = setting(0.05, flag_default=True,
        cite="MAE FINETUNE.md line 73 (--weight_decay 0.05)", help='AdamW weight decay (default {default})')
    betas: tuple[float, float] = no_flag((0.9, 0.999), "AdamW's defaults, which MAE main_finetune.py keeps")
    layer_decay: float = setting(0.75, flag_default=True,
        cite="MAE FINETUNE.md line 91 (ViT-L: --layer_decay 0.75)", help=
        'layer-wise lr decay (default {default}; MAE: 0.65 base, 0.75 large)')
    drop_path: float = setting(0.1, flag_default=True,
        cite="MAE FINETUNE.md line 73 (ViT-B: --drop_path 0.1)", help='stochastic depth rate (default {default})')
    smoothing: float = setting(0.1, flag_default=True,
        cite="MAE main_finetune.py line 84 (--smoothing 0.1)", help='label smoothing (default {default})')
    clip_grad: float = setting(0.0, flag_default=True, help='max gradient norm (default 0: no clipping)')
    random_init: bool = setting(False, help=
        "fine-tune the checkpoint's architecture from fresh weights (the from-scratch baseline)")
    raw_weights: bool = setting(False, help=RAW_WEIGHTS_HELP)
    # A ViT file without gmae's config (timm's, MAE's) says nothing of its input: "" reads it as ImageNet-normalised
    # (as they trained), "none" / "imagenet" say (gmae.io.loader.load). gmae files keep their own.
    input_norm: str = setting("", flags=("--normalize",), choices=INPUT_NORMS, help=ENCODER_NORM_HELP)
    seed: int = setting(0, flag_default=True, help="random seed of the run (default {default})")
    device: str = setting("auto", help=DEVICE_HELP)
    out: str = setting("runs/finetune", flag_default=True, help=
        'folder for checkpoints and metrics.jsonl (default {default})')
    eval_every: int = setting(0, type=positive_int, help='steps between val evaluations (default: an epoch)')
    stop_grace: float = setting(60.0, metavar="S", help=STOP_GRACE_HELP)
    dist_timeout: float = setting(1800.0, metavar="S", help=DIST_TIMEOUT_HELP)  # as TrainConfig.dist_timeout
    checkpoint_every: int = setting(0, type=positive_int, help='steps between checkpoints (default: an epoch)')
    keep_checkpoints: int = setting(2, type=positive_int, help='newest checkpoints kept (default {default})')
    # DataLoader processes: "auto" (gmae.runtime.threads.resolve_workers: some for an image folder on a GPU, else 0)
    # or a number; batches are the same with any number (gmae.data.stream)
    num_workers: int | str = setting("auto", type=workers, metavar="N|auto", help=WORKERS_HELP)
    precision: str = setting("auto", choices=PRECISIONS, flag_default=True, help=
        'auto (default): bf16 autocast on CUDA, fp32 on CPU')
    recipe: str = own_flag("", "--recipe", RECIPE_FLAG)  # a record of the recipe the run started from ("" = none)
    # batch_size is the global batch (all processes), split into accum_steps micro-batches per process, so MAE's
    # effective batch = batch_size x accum_iter x GPUs is batch_size here.
    accum_steps: int = setting(1, type=positive_int, flag_default=True, help=
        "split each process's batch into this many micro-batches (same result, less memory); --batch-size stays "
        "the global batch")
    max_bad_steps: int = setting(10, type=positive_int, flag_default=True, help=
        'non-finite steps in a row (each skipped) before the run gives up (default {default})')
    # ----- MAE's fine-tuning regularisers, from timm (gmae.evaluate.augment; needs `pip install 'gmae[timm]'`
    # when one is on). Defaults: off (gmae's own fine-tuning); MAE's ViT-B values (FINETUNE.md) in the comments.
    mixup: float = setting(0.0, flag_default=True, group=TIMM_GROUP, help='mixup alpha, 0 = off (default 0.0) [0.8]')
    cutmix: float = setting(0.0, flag_default=True, group=TIMM_GROUP, help='cutmix alpha, 0 = off (default 0.0) [1.0]')
    mixup_prob: float = setting(1.0, flag_default=True, group=TIMM_GROUP,
        cite="MAE main_finetune.py line 104 (--mixup_prob 1.0)", help=
        'probability of mixing a batch (default 1.0) [1.0]')
    mixup_switch_prob: float = setting(0.5, flag_default=True, group=TIMM_GROUP,
        cite="MAE main_finetune.py line 106 (--mixup_switch_prob 0.5)", help=
        'with both on: probability of cutmix instead of mixup (default 0.5) [0.5]')
    mixup_mode: str = setting("batch", choices=MIXUP_MODES, flag_default=True, group=TIMM_GROUP,
        cite="MAE main_finetune.py line 108 (--mixup_mode batch)", help=
        'one mixing weight per batch, pair or element (default batch) [batch]')
    aa: str = setting("", metavar="POLICY", flag_default=True, group=TIMM_GROUP, help=
        "RandAugment policy in timm's syntax (default none) [rand-m9-mstd0.5-inc1]")
    reprob: float = setting(0.0, flag_default=True, group=TIMM_GROUP, help=
        'random-erasing probability (default 0.0) [0.25]')
    remode: str = setting("pixel", choices=ERASE_MODES, flag_default=True, group=TIMM_GROUP,
        cite="MAE main_finetune.py line 90 (--remode pixel)", help=
        'random-erasing fill (default pixel) [pixel]')
    recount: int = setting(1, type=positive_int, flag_default=True, group=TIMM_GROUP,
        cite="MAE main_finetune.py line 92 (--recount 1)", help=
        'random-erasing boxes per image (default 1) [1]')
    global_pool: str = setting("avg", choices=GLOBAL_POOLS, flag_default=True, group=TIMM_GROUP,
        cite="MAE main_finetune.py line 115 (global_pool=True: the patch-token mean)", help=
        "classifier feature: avg (fc_norm of the patch-token mean) or cls (the encoder's final norm of the cls "
        'token) (default avg) [avg]')
    warmup_epochs: float = setting(-1.0, group=TIMM_GROUP, help=
        'linear warmup in epochs, instead of --warmup-steps [5]')

    @property

    def mixup_active(self) -> bool:
        """Whether batches are mixed (timm's Mixup, soft-target loss): MAE main_finetune.py line 219."""
        return self.mixup > 0 or self.cutmix > 0

    def check_warmup(self) -> None:
        """GMAEError if both warmup_steps and warmup_epochs were set (a resolved config sets both: see resolved)."""
        if self.warmup_steps >= 0 and self.warmup_epochs >= 0:
            raise GMAEError(f"give warmup steps ({self.warmup_steps}) or warmup epochs ({self.warmup_epochs}), "
                            "not both")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.num_workers = parse_workers(self.num_workers)
        checks = [
            (self.mixup >= 0 and self.cutmix >= 0, f"mixup and cutmix alphas must be >= 0 (0: off); got {self.mixup}, "
                                                   f"{self.cutmix}"),
            (0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1,
             f"mixup-prob and mixup-switch-prob must be in [0, 1]; got {self.mixup_prob}, {self.mixup_switch_prob}"),
            (self.mixup_mode in MIXUP_MODES, f"mixup mode must be one of {', '.join(MIXUP_MODES)}; "
                                             f"got {self.mixup_mode!r}"),
            (not self.mixup_active or self.batch_size % 2 == 0,
             f"mixup and cutmix pair each image with another: the batch size must be even; got {self.batch_size}"),
            (self.aa == "" or self.aa.startswith("rand-") or self.aa == "rand",
             f"aa must be a RandAugment policy such as rand-m9-mstd0.5-inc1 (MAE's), or empty for none; got {self.aa!r}"),
            (0 <= self.reprob <= 1, f"random-erasing probability reprob must be in [0, 1]; got {self.reprob}"),
            (self.remode in ERASE_MODES, f"remode must be one of {', '.join(ERASE_MODES)}; got {self.remode!r}"),
            (self.recount >= 1, f"recount (random-erasing boxes) must be at least 1; got {self.recount}"),
            (self.stop_grace >= 0, f"stop-grace must be >= 0 seconds (0: no limit); got {self.stop_grace}"),
            (self.dist_timeout > 0, f"dist-timeout must be > 0 seconds; got {self.dist_timeout}"),
            (self.global_pool in GLOBAL_POOLS, f"global pool must be one of {', '.join(GLOBAL_POOLS)}; "
                                               f"got {self.global_pool!r}"),
            (self.input_norm in ("", *INPUT_NORMS), f"input normalisation must be one of {', '.join(INPUT_NORMS)} "
                                                    f"(or empty: the file's own); got {self.input_norm!r}"),
            (self.warmup_epochs == -1 or self.warmup_epochs >= 0,
             f"warmup epochs must be >= 0 (or -1: not set); got {self.warmup_epochs}"),
            (self.epochs >= 1 and self.steps >= 0, f"epochs must be >= 1 and steps >= 0; got {self.epochs}, {self.steps}"),
            (self.batch_size >= 1, f"batch size must be at least 1; got {self.batch_size}"),
            (self.accum_steps >= 1 and self.batch_size % self.accum_steps == 0,
             f"batch size {self.batch_size} must be a multiple of accum-steps {self.accum_steps} (>= 1)"),
            (self.max_bad_steps >= 1, f"max-bad-steps must be at least 1; got {self.max_bad_steps}"),
            (self.blr > 0 and self.min_lr >= 0, f"base lr must be positive and min lr >= 0; got {self.blr}, {self.min_lr}"),
            (0 < self.layer_decay <= 1, f"layer decay must be in (0, 1]; got {self.layer_decay}"),
            (0 <= self.drop_path < 1, f"drop path must be in [0, 1); got {self.drop_path}"),
            (0 <= self.smoothing < 1, f"label smoothing must be in [0, 1); got {self.smoothing}"),
            (self.weight_decay >= 0 and self.clip_grad >= 0, "weight decay and clip-grad must be >= 0"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval-every and checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 1, f"keep-checkpoints must be >= 1; got {self.keep_checkpoints}"),
            (self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16; got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GMAEError(message)

    def resolved(self, num_train: int) -> FinetuneConfig:
        """A copy with steps, warmup, eval and checkpoint intervals made concrete for ``num_train`` images.

        warmup_epochs, if set, becomes round(warmup_epochs x steps per epoch) warmup steps (MAE's warmup is
        per iteration in fractional epochs, util/lr_sched.py lines 11-12); it stays recorded beside them.

        A recipe's batch larger than the training set is refused (GMAEError naming both): MAE drops the last
        partial batch (main_finetune.py line 207), so its epoch here would have no step, and every batch
        would repeat each image many times."""
        if self.recipe and self.batch_size > num_train:
            raise GMAEError(f"--recipe {self.recipe}: its batch of {self.batch_size} images is more than the "
                            f"{num_train} training images of {self.data}; give --batch-size {num_train} or less "
                            "(and --blr for it), or more data")
        per_epoch = max(1, math.ceil(num_train / self.batch_size))
        steps = self.steps or self.epochs * per_epoch
        if self.warmup_epochs >= 0:
            warmup = round(self.warmup_epochs * per_epoch)
        else:
            warmup = per_epoch if self.warmup_steps < 0 else self.warmup_steps
        return replace(
            self, steps=steps,
            warmup_steps=min(warmup, steps - 1),
            eval_every=self.eval_every or per_epoch, checkpoint_every=self.checkpoint_every or per_epoch,
        )


# ----- detection fine-tuning (gmae detect; gmae.evaluate.detection): ViTDet's recipe at small scale
#: The generated detection sets (gmae.evaluate.detection.data.generated_set); a COCO file is the other source.
DETECTION_DATA = ("sprites", "deadleaves")
#: Where a generated val set starts: image indices far from the train set's 0, 1, ...
DETECTION_VAL_START = 10**6
# The recipe's defaults are gmae.evaluate.detection.train.DetectionRecipe's (ViTDet's values, cited there); they are
# repeated here so that `gmae detect --help` needs no torch, and tests/test_detect_cli.py keeps the two equal.
DETECTION_GROUP = "ViTDet's recipe (gmae.evaluate.detection.train)"


@dataclass
class DetectConfig:
    """One `gmae detect` run: the encoder, the data (generated or a COCO folder), the recipe, where it writes."""

    checkpoint: str = setting("", help=f"{CHECKPOINT_HELP}, or timm/MAE ViT weights: the detector's backbone "
                              "(not needed with --resume or with --random-init)")
    random_init: bool = setting(False, help=
        "fresh encoder weights drawn with --seed (the baseline): the checkpoint's architecture, else the tiny "
        "preset's at --image-size")
    raw_weights: bool = setting(False, help=RAW_WEIGHTS_HELP)
    input_norm: str = setting("", flags=("--normalize",), choices=INPUT_NORMS, help=ENCODER_NORM_HELP)
    data: str = setting("sprites", choices=DETECTION_DATA, flag_default=True, help=
        "generated images with the boxes and masks of every visible object: sprites (default) or deadleaves; "
        "--data-json trains on a COCO file instead")
    data_json: str = setting("", metavar="FILE", help=
        "a COCO instances .json file to train on (with --images); its last --val-images images are the val set "
        "unless --val-json is given")
    images: str = setting("", metavar="DIR", help="the folder of --data-json's images")
    val_json: str = setting("", metavar="FILE", help="a COCO instances .json file of the val set")
    val_dir: str = setting("", metavar="DIR", help="the folder of --val-json's images (default: --images)")
    train_images: int = setting(2000, type=positive_int, flag_default=True, help=
        "generated train images (default {default})")
    val_images: int = setting(200, type=positive_int, flag_default=True, help=
        "val images: generated ones, or the last ones of --data-json without --val-json (default {default})")
    class_agnostic: bool = setting(False, help="one category, object, instead of the data's own")
    image_size: int = setting(64, type=positive_int, flag_default=True, help=
        "generated images' size; COCO images are resized to it (longer side) (default {default})")
    steps: int = setting(600, type=positive_int, flag_default=True, group=DETECTION_GROUP,
                         help="optimizer steps (default {default})")
    batch_size: int = setting(8, type=positive_int, flag_default=True, group=DETECTION_GROUP,
                              help="global batch size, all processes together (default {default})")
    lr: float = setting(1e-3, flag_default=True, group=DETECTION_GROUP, help=
        "peak AdamW lr (default {default}; ViTDet's 1e-4 is for batch 64 over 184k steps and learns about half as "
        "fast in a short run at batch 8: docs/evaluation.md)")
    weight_decay: float = setting(0.1, flag_default=True, group=DETECTION_GROUP,
                                  help="AdamW weight decay (default {default})")
    layer_decay: float = setting(0.7, flag_default=True, group=DETECTION_GROUP,
                                 help="layer-wise lr decay (default {default})")
    warmup_steps: int = setting(-1, group=DETECTION_GROUP, help=
        "linear warmup steps (default: a twelfth of the run, at most ViTDet's 250)")
    drop_path: float = setting(0.1, flag_default=True, group=DETECTION_GROUP,
                               help="stochastic depth rate (default {default})")
    channels: int = setting(64, type=positive_int, flag_default=True, group=DETECTION_GROUP,
                            help="width of the feature pyramid and the heads (default {default})")
    rois_per_image: int = setting(32, type=positive_int, flag_default=True, group=DETECTION_GROUP, help=
        "proposals sampled per image to train the box head, a quarter of them objects at most (ViTDet: 512 for "
        "COCO's crowded 1024 px images; default {default})")
    flip: bool = setting(True, negatable=True, group=DETECTION_GROUP,
                         help="random horizontal flips of the training images (default on)")
    seed: int = setting(0, flag_default=True, help=
        "seed of the run: new layers, batches, flips, drop path (the generated data are fixed) (default {default})")
    device: str = setting("auto", help=DEVICE_HELP)
    out: str = setting("runs/detect", flag_default=True, help=
        "folder for checkpoints, metrics.jsonl and results.json (default {default})")
    evaluate: bool = setting(True, flags=("--eval",), negatable=True, help=
        "score COCO AP on the val images at the end (default on; --no-eval trains only)")
    checkpoint_every: int = setting(100, type=positive_int, flag_default=True,
                                    help="steps between checkpoints (default {default}; and at the end)")
    keep_checkpoints: int = setting(2, type=positive_int, flag_default=True,
                                    help="newest checkpoints kept (default {default})")
    max_bad_steps: int = setting(10, type=positive_int, flag_default=True, help=
        "non-finite steps in a row (each skipped) before the run gives up (default {default})")
    stop_grace: float = setting(60.0, metavar="S", help=STOP_GRACE_HELP)
    dist_timeout: float = setting(1800.0, metavar="S", help=DIST_TIMEOUT_HELP)

    def __post_init__(self) -> None:
        checks = [
            (self.data in DETECTION_DATA, f"no detection data {self.data!r}: give --data "
                                          f"{' or '.join(DETECTION_DATA)}, or a COCO file with --data-json and --images"),
            (bool(self.data_json) == bool(self.images), "--data-json and --images go together: give both (the COCO "
                                                        "file and the folder of its images) or neither"),
            (not self.val_json or self.data_json, "--val-json is the val set of a COCO run: give --data-json and "
                                                  "--images too"),
            (not self.val_dir or self.val_json, "--val-dir is the folder of --val-json's images: give --val-json too"),
            (self.input_norm in ("", *INPUT_NORMS), f"input normalisation must be one of {', '.join(INPUT_NORMS)} "
                                                    f"(or empty: the file's own); got {self.input_norm!r}"),
            (min(self.steps, self.batch_size, self.train_images, self.val_images, self.image_size, self.channels) >= 1,
             f"steps, batch size, train/val images, image size and channels must be at least 1; got {self.steps}, "
             f"{self.batch_size}, {self.train_images}, {self.val_images}, {self.image_size}, {self.channels}"),
            (self.lr > 0 and self.weight_decay >= 0, f"lr must be > 0 and weight decay >= 0; got {self.lr}, "
                                                     f"{self.weight_decay}"),
            (0 < self.layer_decay <= 1, f"layer decay must be in (0, 1]; got {self.layer_decay}"),
            (0 <= self.drop_path < 1, f"drop path must be in [0, 1); got {self.drop_path}"),
            (self.warmup_steps >= -1, f"warmup steps must be >= 0 (or -1: the default); got {self.warmup_steps}"),
            (self.checkpoint_every >= 1 and self.keep_checkpoints >= 1 and self.max_bad_steps >= 1,
             "checkpoint-every, keep-checkpoints and max-bad-steps must be at least 1"),
            (self.stop_grace >= 0, f"stop-grace must be >= 0 seconds (0: no limit); got {self.stop_grace}"),
            (self.dist_timeout > 0, f"dist-timeout must be > 0 seconds; got {self.dist_timeout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GMAEError(message)

    @property
    def warmup(self) -> int:
        """The warmup steps of the run: the given ones, else a twelfth of the run, at most ViTDet's 250."""
        return self.warmup_steps if self.warmup_steps >= 0 else min(250, self.steps // 12)


# ----- the linear and kNN probes of a frozen encoder (gmae probe; gmae.evaluate.probe and gmae.evaluate.scene)
#: The probes' feature (gmae.evaluate.probe): the cls token (MAE's linear probe) or the mean of the patch tokens.
PROBE_POOLS = ("cls", "avg")
_CACHED, _MAE = PROBE_DEFAULTS["cached"], PROBE_DEFAULTS["mae"]
#: The --help section of the linear probe's protocol and schedule.
PROTOCOL_GROUP = "linear-probe protocol"


@dataclass
class ProbeConfig:
    """How `gmae probe` probes an encoder: the feature, the linear probe's protocol and schedule (None: the
    protocol's own, gmae.config.choices.PROBE_DEFAULTS), kNN's neighbours and vote temperature, the scene probes'
    split sizes. Which encoder it probes (--checkpoint, --random-init, --baseline, --raw-weights, --normalize) and
    how it prints are the command's own flags."""

    data: str = setting("digits", flag_default=True, help=LABELLED_DATA_HELP + "; or deadleaves / sprites for the "
                        "scene probes (see --task)")
    pool: str = setting("cls", choices=PROBE_POOLS, flag_default=True, help=
        "feature: cls token (default, MAE's linear probe) or mean of patch tokens, after the final norm")
    train_images: int = setting(SCENE_IMAGES["train"], type=positive_int, flag_default=True,
                                help="scene probes: train images (default {default})")
    val_images: int = setting(SCENE_IMAGES["val"], type=positive_int, flag_default=True,
                              help="scene probes: val images (default {default})")
    k: int = setting(20, type=positive_int, flag_default=True, help="kNN neighbours (default {default})")
    temperature: float = setting(0.07, flag_default=True, help="kNN vote temperature T (default {default})")
    protocol: str = setting("cached", choices=PROBE_PROTOCOLS, flag_default=True, group=PROTOCOL_GROUP, help=
        "cached (default): SGD on the features of the un-augmented images, computed once (fast); mae: MAE's "
        "main_linprobe.py (BatchNorm + linear head, LARS, the encoder run on every augmented training batch; "
        "scenes: count and shape only). See docs/evaluation.md")
    epochs: int | None = setting(None, type=positive_int, group=PROTOCOL_GROUP, help=
        f"linear-probe epochs (default: cached {_CACHED['epochs']}, mae {_MAE['epochs']})")
    batch_size: int | None = setting(None, type=positive_int, group=PROTOCOL_GROUP, help=
        f"cached: the feature-extraction batch (default {EXTRACTION_BATCH}; the probe trains at "
        f"{_CACHED['batch_size']}); mae: the training batch, at most the train set (default {_MAE['batch_size']}; "
        "MAE: 16384)")
    blr: float | None = setting(None, group=PROTOCOL_GROUP, help=
        f"linear-probe base lr; lr = blr * batch / 256 (default: cached {_CACHED['blr']}; mae {_MAE['blr']}, MAE's "
        "lr per LARS step at batch 256 (MAE: 0.1 at batch 16384))")
    weight_decay: float | None = setting(None, group=PROTOCOL_GROUP,
                                         help=f"linear-probe weight decay (default {_MAE['weight_decay']:g})")
    warmup_epochs: float | None = setting(None, group=PROTOCOL_GROUP, help=
        f"linear-probe warmup epochs, at most half the epochs (default {_MAE['warmup_epochs']})")
    seed: int = setting(0, flag_default=True, help="linear-probe seed (and --random-init's for files that are not "
                        "gmae checkpoints; a checkpoint's initial weights use its run's seed)")
    recipe: str = own_flag("", "--recipe", RECIPE_FLAG)  # a record of the recipe the probe started from ("" = none)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise GMAEError(f"temperature must be positive; got {self.temperature}")

    def linear(self) -> tuple[int, dict]:
        """(feature-extraction batch, the linear probe's settings as probe() and scene_probe() take them): the
        given settings over the protocol's defaults; GMAEError for impossible ones."""
        given = {k: getattr(self, k) for k in PROBE_DEFAULTS[self.protocol] if getattr(self, k) is not None}
        if self.protocol == "cached":  # batch_size is the extraction batch; the probe's own stays at its default
            extraction = given.pop("batch_size", EXTRACTION_BATCH)
        else:
            extraction = given.get("batch_size", _MAE["batch_size"])
        values = {**PROBE_DEFAULTS[self.protocol], **given}
        if not values["blr"] > 0 or values["weight_decay"] < 0 or values["warmup_epochs"] < 0:
            raise GMAEError(f"the linear probe needs blr > 0 (got {values['blr']}), weight decay >= 0 (got "
                            f"{values['weight_decay']}) and warmup epochs >= 0 (got {values['warmup_epochs']}; at most "
                            "half the epochs are used)")
        values["linear_batch"] = values.pop("batch_size")
        return extraction, values


__all__ = ["ModelConfig", "TrainConfig", "FinetuneConfig", "ProbeConfig", "DetectConfig", "DETECT_RESUMABLE",
           "DETECTION_DATA", "PROBE_POOLS", "PRESETS", "TRAIN_PRESETS", "CAMERAS", "SIZE_FROM_DEPTH_CAMERAS",
           "DEPTH_PARAMS", "DEPTH_GRADS", "POSITION_PARAMS", "GLOBAL_POOLS", "MIXUP_MODES", "ERASE_MODES",
           "INPUT_NORMS", "POSITION_SOURCES", "PIXEL_ORIGINS", "TILE_CUTS", "HEAD_INITS", "PATCH_BIAS_INITS", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "PRETRAIN_RESUMABLE", "FINETUNE_RESUMABLE", "model_config",
           "train_config", "config_from_dict", "as_dict", "preset_of", "setting", "no_flag", "own_flag", "PRECISIONS",
           "BAD_IMAGE_ACTIONS"]
