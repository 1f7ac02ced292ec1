"""Model and training settings: the dataclasses and the named presets.

`ModelConfig` is everything needed to rebuild a model (it is stored in every
checkpoint); `TrainConfig` is everything about one pre-training run,
`FinetuneConfig` about one fine-tuning run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from ..errors import GMAEError

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
    model: str = "gmae"  # "gmae" (Gaussian decoder + splatting) or "mae" (pixel decoder)
    img_size: int = 64
    patch_size: int = 8
    in_chans: int = 3
    # ViT encoder
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    # light decoder
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    # pre-training objective
    mask_ratio: float = 0.75
    loss: str = "masked"  # "masked" | "all" | "masked_normpix"
    # GMAE only
    num_gaussians: int = 256  # k, independent of the number of masked patches
    # m: Gaussians each query token emits; the decoder runs k / m query tokens (m must divide k)
    gaussians_per_query: int = 1
    position_param: str = "anchored"  # with m > 1: see POSITION_PARAMS
    max_scale: float = 1.0  # c: scale = c * sigmoid(s); c = 1 -> largest std ~ W/16 pixels
    max_opacity: float = 1.0  # opacity = max_opacity * sigmoid; > 1: flat-topped Gaussians with sharp rims
    opacity_reg: float = 0.0  # loss += opacity_reg * mean opacity / max_opacity: fewer, larger Gaussians
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # authors' white
    render_backend: str = "auto"
    camera: str = "authors"  # a name in CAMERAS (gmae.render.camera); best-measuring in docs/reports/depth.md
    depth_param: str = "bounded"  # z parametrisation, see DEPTH_PARAMS
    depth_grad: str = "off"  # see DEPTH_GRADS
    depth_tau: float = 0.1  # temperature (depth units) of the swap relaxation or of the weighted compositing
    # The encoder's input normalisation, see INPUT_NORMS; part of the model so that every user of a checkpoint
    # (fine-tuning, probes, readouts, export) feeds it as it was trained.
    input_norm: str = "none"
    # --- the GMAE authors' code's choices (docs/fidelity.md); each default is gmae's own choice, so a checkpoint
    # saved without them reads as what it was (no LEGACY_VALUES needed).
    rotation_param: str = "normalize"  # see ROTATION_PARAMS
    query_init: str = "normal"  # see QUERY_INITS
    # Whether the Gaussian head has a bias. The bias also sets each Gaussian's starting size and opacity (GMAE.build_head);
    # without it they start around c·sigmoid(0) = c/2 and max_opacity/2 (the authors' bias-free head).
    head_bias: bool = True
    max_alpha: float = 0.99  # clamp on each Gaussian's alpha in the rasterizer: 0.99 as 3DGS; the authors' 0.999
    # --- what places the Gaussians (docs/reports/layout.md); each default is the behaviour
    # from before it. position_gain: x, y = 2·(sigmoid(gain·raw) − ½), a gain g makes positions g times as fast to
    # learn; query_noise: std of Gaussian noise added to each query embedding, per image, while training;
    # position_source: see POSITION_SOURCES.
    position_gain: float = 1.0
    query_noise: float = 0.0
    position_source: str = "head"
    pixel_origin: str = "centre"  # see PIXEL_ORIGINS
    tile_cut: str = "alpha"  # see TILE_CUTS
    head_init: str = "xavier"  # see HEAD_INITS
    patch_bias_init: str = "zero"  # see PATCH_BIAS_INITS

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


def parse_workers(value) -> int | str:
    """A num-workers setting: "auto" (gmae.runtime.threads.resolve_workers decides per data source and machine)
    or an integer >= 0 (0: load in the training process); GMAEError otherwise."""
    if value == "auto":
        return "auto"
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise GMAEError(f"num-workers must be auto or an integer >= 0 (0: load in the training process); "
                        f"got {value!r}")
    return int(text)


@dataclass
class TrainConfig:
    data: str = "deadleaves"  # "deadleaves" | "sprites" | "photos" | "digits" | path to an image folder
    steps: int = 1000
    batch_size: int = 64  # global batch
    blr: float = 1e-3  # base lr (the GMAE authors' default); lr = blr * batch_size / 256
    warmup_steps: int = 100
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    device: str = "auto"  # CUDA when available, else the CPU (gmae.runtime.distributed.resolve_device)
    out: str = "runs/pretrain"
    checkpoint_every: int = 500
    log_every: int = 1
    # DataLoader processes: "auto" (gmae.runtime.threads.resolve_workers: some for an image folder on a GPU, else 0)
    # or a number; batches are the same with any number (gmae.data.stream)
    num_workers: int | str = "auto"
    keep_checkpoints: int = 3  # newest N kept
    accum_steps: int = 1  # micro-batches per optimizer step (the batch is split, not multiplied)
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 10  # consecutive non-finite losses (each step skipped) before giving up
    on_bad_image: str = "skip"  # unreadable image during training: "skip" (logged, counted) | "error"
    init_encoder: str = ""  # fresh runs: encoder weights from this file (gmae.io.loader.load); "" = random
    ema: float = 0.0  # decay of an fp32 exponential moving average of the weights (gmae.model.ema); 0 = none
    # ---- the online probe (gmae.model.online_probe).
    # A linear classifier per encoder block on the batch's labels, on detached features: the model trains exactly
    # as without it (gmae.model.online_probe); needs labelled data (gmae.data.sourcelabels).
    online_probe: bool = False
    # --- recipes (gmae.config.recipes) and the settings they need; each default is the run without a recipe.
    recipe: str = ""  # the gmae.config.recipes recipe the command line started from ("" = none); a record
    # The run's length in epochs of the data set (None: `steps` is the length). Made concrete by `resolved` once
    # the data set's size and the processes are known: `steps` is then the steps it came to.
    epochs: float | None = None
    warmup_epochs: float | None = None  # warmup in epochs (None: `warmup_steps`); resolved into warmup_steps
    # Per-process micro-batch (0: none; accum_steps splits the batch). With it, batch_size is the effective batch
    # and accum_steps = batch_size / (processes x micro_batch), as MAE's accum_iter (PRETRAIN.md line 18).
    micro_batch: int = 0
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (MAE main_pretrain.py line 124)
    interpolation: str = "bicubic"  # of the random resized crop, see INTERPOLATIONS
    # Steps between measurements of whether the Gaussians follow the image (gmae.readouts.layout: the layout figures
    # and the full-image PSNR on a fixed held-out batch, logged in metrics.jsonl); 0 = never. GMAE only.
    layout_every: int = 100
    # Seconds a run may take to reach its step boundary after a stop signal before it exits at once
    # (gmae.runtime.stopping.StopGuard); 0 = wait for the step however long it takes.
    stop_grace: float = 60.0
    # Under torchrun: seconds a collective may wait for the other processes before this one ends with an error
    # naming its rank (gmae.runtime.distributed.DEFAULT_TIMEOUT: torch's own 30 minutes, and why not less).
    dist_timeout: float = 1800.0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self._check_recipe_settings()
        if self.precision not in ("auto", "fp32", "bf16"):
            raise GMAEError(f"precision must be auto, fp32 or bf16; got {self.precision!r}")
        if self.on_bad_image not in ("skip", "error"):
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
    checkpoint: str = ""  # the pre-trained model fine-tuned (a record; resume does not need it)
    data: str = "digits"  # a gmae.data.labelled spec
    epochs: int = 5
    steps: int = 0  # optimizer steps; 0: epochs x ceil(train size / batch)
    batch_size: int = 32
    blr: float = 8e-3  # lr = blr * batch / 256 = 1e-3 at batch 32 (MAE base: blr 5e-4 at batch 1024)
    min_lr: float = 1e-6
    warmup_steps: int = -1  # -1: one epoch (unless warmup_epochs is given)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75
    drop_path: float = 0.1
    smoothing: float = 0.1
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    random_init: bool = False  # fine-tune the architecture from fresh weights (the baseline)
    raw_weights: bool = False  # the checkpoint's raw weights, not the EMA of them it may hold
    # A ViT file without gmae's config (timm's, MAE's) says nothing of its input: "" reads it as ImageNet-normalised
    # (as they trained), "none" / "imagenet" say (gmae.io.loader.load). gmae files keep their own.
    input_norm: str = ""
    seed: int = 0
    device: str = "auto"  # CUDA when available, else the CPU (gmae.runtime.distributed.resolve_device)
    out: str = "runs/finetune"
    eval_every: int = 0  # steps between val evaluations; 0: once per epoch (and always at the end)
    stop_grace: float = 60.0  # as TrainConfig.stop_grace
    dist_timeout: float = 1800.0  # as TrainConfig.dist_timeout
    checkpoint_every: int = 0  # steps between checkpoints; 0: once per epoch (and always at the end)
    keep_checkpoints: int = 2
    num_workers: int | str = "auto"  # as TrainConfig.num_workers
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA) | "fp32" | "bf16"
    recipe: str = ""  # the gmae.config.recipes recipe the command line started from ("" = none); a record
    # Micro-batches per optimizer step: batch_size is the global batch (all processes), split into accum_steps
    # parts per process, so MAE's effective batch = batch_size x accum_iter x GPUs is batch_size here.
    accum_steps: int = 1
    max_bad_steps: int = 10  # consecutive non-finite steps (each skipped) before giving up, as TrainConfig's
    # ----- MAE's fine-tuning regularisers, from timm (gmae.evaluate.augment; needs `pip install 'gmae[timm]'`
    # when one is on). Defaults: off (gmae's own fine-tuning); MAE's ViT-B values (FINETUNE.md) in the comments.
    mixup: float = 0.0  # mixup alpha; 0 = off (MAE ViT-B: 0.8)
    cutmix: float = 0.0  # cutmix alpha; 0 = off (MAE ViT-B: 1.0)
    mixup_prob: float = 1.0  # probability of mixing a batch at all (MAE: 1.0)
    mixup_switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup (MAE: 0.5)
    mixup_mode: str = "batch"  # one lambda per "batch" | "pair" | "elem" (MAE: batch)
    aa: str = ""  # RandAugment policy, timm's syntax; "" = none (MAE: rand-m9-mstd0.5-inc1)
    reprob: float = 0.0  # random-erasing probability (MAE: 0.25)
    remode: str = "pixel"  # random-erasing fill, see ERASE_MODES (MAE: pixel)
    recount: int = 1  # random-erasing boxes per image (MAE: 1)
    global_pool: str = "avg"  # the classifier's feature, see GLOBAL_POOLS (MAE's fine-tuning: avg)
    warmup_epochs: float = -1.0  # linear warmup in epochs instead of warmup_steps; -1 = not set (MAE ViT-B: 5)

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
        per iteration in fractional epochs, util/lr_sched.py lines 11-12); it stays recorded beside them."""
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


__all__ = ["ModelConfig", "TrainConfig", "FinetuneConfig", "PRESETS", "TRAIN_PRESETS", "CAMERAS", "SIZE_FROM_DEPTH_CAMERAS",
           "DEPTH_PARAMS", "DEPTH_GRADS", "POSITION_PARAMS", "GLOBAL_POOLS", "MIXUP_MODES", "ERASE_MODES",
           "INPUT_NORMS", "POSITION_SOURCES", "PIXEL_ORIGINS", "TILE_CUTS", "HEAD_INITS", "PATCH_BIAS_INITS", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "PRETRAIN_RESUMABLE", "FINETUNE_RESUMABLE", "model_config",
           "train_config", "config_from_dict", "as_dict", "preset_of"]
