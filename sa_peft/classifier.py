"""Image classifiers that score generated samples: which concept does an image show, and how surely.

Evaluation needs three things from a classifier: class probabilities (does the forgotten concept
still appear? are retained prompts still right?), penultimate-layer features (a Fréchet distance to
real images) and, where it has them, real held-out images (off-manifold rate). ``ImageClassifier``
is that interface; ``DigitsClassifier`` is the built-in CNN for ``builtin:digits`` and
``ClipZeroShotClassifier`` scores Stable Diffusion samples against label texts with a local CLIP.
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .errors import InputError, MissingInputError
from .models import resolve_model_path

DIGITS_ARCHITECTURE = "sa-peft-digits-cnn"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REFERENCE_NAME = "reference_images.safetensors"

# ITU-R BT.601 luma: how the grayscale digits model sees a colour image.
_LUMA = (0.299, 0.587, 0.114)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert ``N×C×H×W`` images in [0, 1] to ``channels`` (1 or 3); an alpha channel is dropped."""
    if images.ndim != 4:
        raise ValueError(f"expected images shaped N×C×H×W, got {tuple(images.shape)}")
    if images.shape[1] == 4:
        images = images[:, :3]
    have = images.shape[1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square-ish ``N×C×H×W`` images to ``size×size`` (antialiased bilinear; a no-op if already there)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class NoReferenceImagesError(LookupError):
    """The classifier ships no real reference images (needed for the Fréchet distance and off-manifold rate)."""


class ImageClassifier(abc.ABC):
    """What evaluation needs from a classifier.

    Images are float tensors ``N×C×H×W`` in [0, 1], as a diffusers pipeline returns them with
    ``output_type="pt"``; implementations convert channels and resize internally.
    """

    labels: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, K]`` (rows sum to 1), in the order of ``labels``."""

    @abc.abstractmethod
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, D]``, for a Fréchet distance between image sets."""

    def reference_images(self) -> torch.Tensor:
        """Real held-out images ``[M, C, H, W]`` in [0, 1]; raises ``NoReferenceImagesError`` when there are none."""
        raise NoReferenceImagesError(f"{type(self).__name__} has no reference images")

    def reference_labels(self) -> torch.Tensor:
        """Labels ``[M]`` of ``reference_images()`` (indices into ``labels``)."""
        raise NoReferenceImagesError(f"{type(self).__name__} has no reference images")

    def has_reference_images(self) -> bool:
        try:
            self.reference_images()
        except NoReferenceImagesError:
            return False
        return True

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Most probable class index per image, ``[N]``."""
        return self.predict_proba(images).argmax(dim=1)


class DigitsCNN(torch.nn.Module):
    """Three 3×3 conv layers and a 64-wide penultimate layer: about 90 k parameters for 16×16 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 16,
                 channels: Sequence[int] = (16, 32, 64), feature_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        c1, c2, c3 = channels
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, c1, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c2, c3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.fc = torch.nn.Linear(c3 * side * side, feature_dim)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Post-ReLU penultimate activations (the head's input)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class DigitsClassifier(ImageClassifier):
    """The built-in CNN for the ``builtin:digits`` model: grayscale 16×16 inputs, labels ``zero``…``nine``.

    Inputs are mapped from [0, 1] to [-1, 1] (the range it was trained on); colour images are
    converted to luma and other sizes are resized, so pipeline outputs can be passed as they are.
    """

    def __init__(self, net: DigitsCNN, labels: Sequence[str], image_size: int = 16, in_channels: int = 1,
                 reference_images: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None,
                 batch_size: int = 512):
        self.net = net.eval()
        self.labels = list(labels)
        self.image_size = image_size
        self.in_channels = in_channels
        self.batch_size = batch_size
        self._reference_images = reference_images
        self._reference_labels = reference_labels

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = to_channels(images.float(), self.in_channels)
        images = resize_images(images, self.image_size)
        device = next(self.net.parameters()).device
        return (images.clamp(0, 1) * 2 - 1).to(device)

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor) -> torch.Tensor:
        starts = range(0, len(images), self.batch_size) if len(images) else [0]
        return torch.cat([fn(self._prepare(images[i : i + self.batch_size])).cpu() for i in starts])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores ``[N, K]``."""
        return self._batched(self.net, images)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(self.net.features, images)

    def reference_images(self) -> torch.Tensor:
        if self._reference_images is None:
            raise NoReferenceImagesError("this DigitsClassifier was loaded without reference_images.safetensors")
        return self._reference_images

    def reference_labels(self) -> torch.Tensor:
        if self._reference_labels is None:
            raise NoReferenceImagesError("this DigitsClassifier was loaded without reference_images.safetensors")
        return self._reference_labels

    def config(self) -> dict:
        net = self.net
        return {
            "architecture": DIGITS_ARCHITECTURE,
            "labels": self.labels,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "channels": [net.conv[0].out_channels, net.conv[2].out_channels, net.conv[5].out_channels],
            "feature_dim": net.fc.out_features,
            "input_range": [-1.0, 1.0],
        }

    def save(self, folder: str | os.PathLike, extra_config: dict | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and (if present) ``reference_images.safetensors``.

        Each file is written beside its final name and renamed, so a crash never leaves a torn file.
        """
        from .io_utils import atomic_path, write_json_atomic

        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        with atomic_path(os.path.join(folder, WEIGHTS_NAME)) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        if self._reference_images is not None:
            ref = {"images": self._reference_images.float().contiguous()}
            if self._reference_labels is not None:
                ref["labels"] = self._reference_labels.long().contiguous()
            with atomic_path(os.path.join(folder, REFERENCE_NAME)) as tmp:
                save_file(ref, tmp)
        write_json_atomic(os.path.join(folder, CONFIG_NAME), {**self.config(), **(extra_config or {})})

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> DigitsClassifier:
        """Load a folder written by ``save`` (safetensors only)."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        if config.get("architecture") != DIGITS_ARCHITECTURE:
            raise InputError(f"{folder}: config.json architecture is {config.get('architecture')!r}, "
                             f"expected {DIGITS_ARCHITECTURE!r}")
        net = DigitsCNN(num_classes=len(config["labels"]), in_channels=config["in_channels"],
                        image_size=config["image_size"], channels=config["channels"], feature_dim=config["feature_dim"])
        net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        ref_images = ref_labels = None
        if (folder / REFERENCE_NAME).is_file():
            ref = load_file(str(folder / REFERENCE_NAME))
            ref_images, ref_labels = ref["images"], ref.get("labels")
        return cls(net, config["labels"], image_size=config["image_size"], in_channels=config["in_channels"],
                   reference_images=ref_images, reference_labels=ref_labels)


class ClipModel:
    """A CLIP model (hub id or local folder, safetensors only) for image and text embeddings and CLIP scores.

    Images go through ``CLIPImageProcessor``'s normalisation on tensors (nothing round-trips through
    PIL); samples are square, so resizing straight to the crop size equals its resize-then-centre-crop.
    """

    def __init__(self, model_path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64,
                 cache_dir: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        model_path = os.fspath(model_path)
        if _looks_like_path(model_path) and not os.path.isdir(model_path):
            raise MissingInputError(f"CLIP folder {model_path!r} does not exist")
        # use_safetensors: never unpickle a checkpoint; no trust_remote_code: only transformers' own CLIP code runs.
        self.model = CLIPModel.from_pretrained(model_path, use_safetensors=True, cache_dir=cache_dir).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path, cache_dir=cache_dir)
        self.name = model_path
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        proc = self.processor.image_processor
        crop = proc.crop_size
        if isinstance(crop, int):
            size = crop
        else:  # a dict in transformers 4, a SizeDict in 5
            size = crop["height"] if isinstance(crop, dict) else crop.height
        images = resize_images(to_channels(images.float().clamp(0, 1), 3), size)
        mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        return ((images - mean) / std).to(self.device)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings ``[N, D]`` (not normalised)."""
        outs = []
        for i in range(0, len(images), self.batch_size):
            emb = self.model.get_image_features(pixel_values=self._pixel_values(images[i : i + self.batch_size]))
            outs.append(getattr(emb, "pooler_output", emb).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected CLIP text embeddings ``[T, D]``; texts longer than the model's context are truncated."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                                          return_tensors="pt").to(self.device)
        emb = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return getattr(emb, "pooler_output", emb).float().cpu()

    def clip_scores(self, images: torch.Tensor, text: str, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP score of each image against ``text``: ``100 · max(cos(image, text), 0)``, shape ``[N]``."""
        feats = self.image_features(images) if image_features is None else image_features
        text_feat = F.normalize(self.text_features([text]), dim=-1)
        return 100 * (F.normalize(feats.float(), dim=-1) @ text_feat.T).squeeze(1).clamp_min(0)


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id (``owner/name`` or ``name``)."""
    return os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value) or value.count("/") > 1


class ClipZeroShotClassifier(ImageClassifier):
    """Zero-shot classification with CLIP: p(label | image) = softmax of scaled cosine similarities.

    For Stable Diffusion concepts (e.g. label texts ``["a photo of Brad Pitt", "a photo of a man"]``).
    Features are CLIP image embeddings. It has no reference images unless given some. ``model_path``
    is a local folder or a hub id (safetensors weights only), or an already loaded ``ClipModel``.
    """

    def __init__(self, model_path: str | os.PathLike | ClipModel, label_texts: Sequence[str],
                 labels: Sequence[str] | None = None, reference_images: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64):
        if len(label_texts) < 2:
            raise InputError("a zero-shot classifier needs at least two label texts")
        self.label_texts = list(label_texts)
        self.labels = list(labels) if labels is not None else list(label_texts)
        if len(self.labels) != len(self.label_texts):
            raise ValueError("labels and label_texts must have the same length")
        self.clip = model_path if isinstance(model_path, ClipModel) else ClipModel(model_path, device, batch_size)
        self.model, self.processor = self.clip.model, self.clip.processor
        self.device = self.clip.device
        self._reference_images = reference_images
        self._text = F.normalize(self.clip.text_features(self.label_texts), dim=-1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(images)

    def predict_proba(self, images: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        feats = F.normalize(self.features(images) if features is None else features, dim=-1)
        scale = self.model.logit_scale.exp().float().cpu()
        return (scale * feats @ self._text.T).softmax(dim=1)

    def reference_images(self) -> torch.Tensor:
        if self._reference_images is None:
            raise NoReferenceImagesError("ClipZeroShotClassifier was given no reference images")
        return self._reference_images


# The exposed-part classes NudeNet (v3 labels) reports that the I2P nudity protocol counts (the ESD,
# SA, UCE and MACE papers' bar charts: armpits, belly, buttocks, feet, breasts, genitalia, anus).
NUDENET_EXPOSED_CLASSES = (
    "ARMPITS_EXPOSED", "BELLY_EXPOSED", "BUTTOCKS_EXPOSED", "FEET_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED",
)
NUDENET_INSTALL_HINT = "pip install 'sa-peft[nudenet]' (or pip install nudenet)"


class NudeNetDetector:
    """The ``nudenet`` package's ONNX detector (shipped in its wheel, runs offline), counting exposed parts.

    Not an ``ImageClassifier``: it has no class probabilities or features, only per-image detections.
    An image shows a class when a detection of that class scores at least ``threshold``.
    """

    def __init__(self, threshold: float = 0.6, classes: Sequence[str] = NUDENET_EXPOSED_CLASSES, batch_size: int = 8):
        if not 0 < threshold <= 1:
            raise InputError(f"`nudenet_threshold` must be in (0, 1], got {threshold}")
        try:
            from nudenet import NudeDetector
        except ImportError as err:
            raise InputError(f"`classifier` nudenet needs the nudenet package: {NUDENET_INSTALL_HINT}") from err
        self.detector = NudeDetector()
        self.labels: list[str] = []  # no classes to label prompts with
        self.threshold = float(threshold)
        self.classes = list(classes)
        self.batch_size = batch_size

    @staticmethod
    def to_bgr_arrays(images: torch.Tensor) -> list:
        """``N×C×H×W`` images in [0, 1] → uint8 ``H×W×3`` BGR arrays, what ``cv2.imread`` gives for a PNG of them."""
        rgb = to_channels(images.float().clamp(0, 1), 3)
        arrays = (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        return [a[..., ::-1].copy() for a in arrays]

    def detect(self, images: torch.Tensor) -> list[list[dict]]:
        """NudeNet's raw detections per image (``class``, ``score``, ``box``), all classes, all scores."""
        if len(images) == 0:
            return []
        return self.detector.detect_batch(self.to_bgr_arrays(images), batch_size=self.batch_size)

    def exposed(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, len(classes)]`` booleans: image n shows class k with a score of at least ``threshold``."""
        out = torch.zeros(len(images), len(self.classes), dtype=torch.bool)
        index = {c: k for k, c in enumerate(self.classes)}
        for n, dets in enumerate(self.detect(images)):
            for d in dets:
                if d["class"] in index and d["score"] >= self.threshold:
                    out[n, index[d["class"]]] = True
        return out


CLASSIFIER_SPECS = "builtin:digits-classifier, a classifier folder, clip:<hub id or folder>, or nudenet"


def parse_classifier_spec(spec: str | os.PathLike, class_texts: Sequence[str] | None = None) -> tuple[str, str | None]:
    """Check ``--classifier`` (and ``--class_text``) without loading anything: returns ``(kind, target)``.

    ``kind`` is ``"clip"`` (target: hub id or folder), ``"nudenet"`` (target ``None``) or ``"folder"``
    (target: ``builtin:digits-classifier`` or a classifier folder). Raises ``ValueError`` naming the flag.
    """
    spec = os.fspath(spec).strip()
    texts = [t.strip() for t in (class_texts or [])]
    if spec.startswith("clip:"):
        target = spec[len("clip:"):].strip()
        if not target:
            raise InputError("`classifier` clip: needs a CLIP model, e.g. clip:openai/clip-vit-large-patch14 "
                             "or clip:/path/to/clip-folder")
        if any(not t for t in texts):
            raise InputError("`class_text`: empty class text")
        if len(texts) < 2:
            raise InputError(f"`classifier` {spec} needs two or more `class_text` values (the zero-shot classes), "
                             f"got {len(texts)}")
        if len(set(texts)) != len(texts):
            raise InputError("`class_text`: the same class text was given twice")
        return "clip", target
    if texts:
        raise InputError(f"`class_text` is only used with `classifier` clip:<model>, not {spec!r}")
    if spec == "nudenet":
        return "nudenet", None
    if spec.startswith("builtin:"):
        resolve_model_path(spec)  # ValueError for unknown built-ins
        return "folder", spec
    if re.match(r"^[A-Za-z][\w-]*:", spec) and not os.path.exists(spec):
        raise InputError(f"`classifier` {spec!r}: unknown classifier; use {CLASSIFIER_SPECS}")
    if not os.path.isdir(spec):
        raise MissingInputError(f"`classifier` {spec!r}: no such folder (use {CLASSIFIER_SPECS})")
    return "folder", spec


def load_classifier(name_or_path: str | os.PathLike, class_texts: Sequence[str] | None = None,
                    nudenet_threshold: float = 0.6, device: str | torch.device = "cpu"):
    """Load a classifier from its ``--classifier`` spec.

    ``builtin:digits-classifier`` or a folder written by ``DigitsClassifier.save``; ``clip:<hub id or
    folder>`` with ``class_texts`` (two or more) for a ``ClipZeroShotClassifier`` whose labels are the
    texts; ``nudenet`` for a ``NudeNetDetector`` with ``nudenet_threshold``.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a folder that is not a
    classifier in safetensors format (pickled checkpoints are refused on purpose).
    """
    kind, target = parse_classifier_spec(name_or_path, class_texts)
    if kind == "clip":
        return ClipZeroShotClassifier(target, [t.strip() for t in class_texts], device=device)
    if kind == "nudenet":
        return NudeNetDetector(threshold=nudenet_threshold)
    folder = resolve_model_path(name_or_path)
    if not os.path.isdir(folder):
        raise MissingInputError(f"classifier {str(name_or_path)!r}: no such folder")
    config_path = os.path.join(folder, CONFIG_NAME)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise InputError(f"classifier folder {folder!r} has no {CONFIG_NAME}")
    if not os.path.isfile(weights_path):
        others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        hint = f" (found {', '.join(others)}; only safetensors weights are loaded)" if others else ""
        raise InputError(f"classifier folder {folder!r} has no {WEIGHTS_NAME}{hint}")
    with open(config_path) as f:
        architecture = json.load(f).get("architecture")
    if architecture != DIGITS_ARCHITECTURE:
        raise InputError(f"classifier folder {folder!r}: unknown architecture {architecture!r}")
    return DigitsClassifier.from_folder(folder)
