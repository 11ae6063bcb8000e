"""The built-in digits classifier and the classifier interface used by evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_clip

from sa_peft.classifier import (
    ClipZeroShotClassifier,
    DigitsClassifier,
    DigitsCNN,
    ImageClassifier,
    NoReferenceImagesError,
    load_classifier,
    resize_images,
    to_channels,
)

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return load_classifier("builtin:digits-classifier")


def test_builtin_classifier_metadata(classifier):
    assert isinstance(classifier, ImageClassifier)
    assert classifier.labels == DIGIT_WORDS
    ref = classifier.reference_images()
    assert ref.ndim == 4 and ref.shape[1:] == (1, 16, 16)
    assert ref.min() >= 0 and ref.max() <= 1
    assert classifier.reference_labels().shape == (len(ref),)
    assert sum(p.numel() for p in classifier.net.parameters()) < 250_000  # stays under 1 MB in fp32


def test_builtin_classifier_heldout_accuracy(classifier):
    images, labels = classifier.reference_images(), classifier.reference_labels()
    accuracy = (classifier.predict(images) == labels).float().mean().item()
    assert accuracy >= 0.97
    # Every class is present in the held-out set (stratified split).
    assert torch.bincount(labels, minlength=10).min() >= 30


def test_predict_proba_and_features_shapes(classifier):
    images = classifier.reference_images()[:7]
    probs = classifier.predict_proba(images)
    assert probs.shape == (7, 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(7), atol=1e-5)
    assert classifier.features(images).shape == (7, 64)
    assert classifier.predict_proba(images[:0]).shape == (0, 10)


def test_colour_and_resized_inputs_match_grayscale(classifier):
    images = classifier.reference_images()[:40]
    base = classifier.predict(images)
    rgb = images.expand(-1, 3, -1, -1)
    assert torch.equal(classifier.predict(rgb), base)
    big = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    assert (classifier.predict(big) == base).float().mean() >= 0.95


def test_channel_and_size_helpers():
    x = torch.rand(2, 4, 8, 8)
    assert to_channels(x, 1).shape == (2, 1, 8, 8)
    assert to_channels(x[:, :1], 3).shape == (2, 3, 8, 8)
    assert resize_images(x, 8) is x
    assert resize_images(x, 4).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError):
        to_channels(torch.rand(2, 2, 8, 8), 3)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    clf = DigitsClassifier(DigitsCNN(), DIGIT_WORDS, reference_images=torch.rand(5, 1, 16, 16),
                           reference_labels=torch.arange(5))
    clf.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "reference_images.safetensors"]
    loaded = load_classifier(tmp_path)
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(loaded.predict_proba(x), clf.predict_proba(x), atol=1e-6)
    assert torch.equal(loaded.reference_labels(), torch.arange(5))


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        load_classifier(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "sa-peft-digits-cnn"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        load_classifier(tmp_path)


def test_classifier_without_reference_images():
    clf = DigitsClassifier(DigitsCNN(), DIGIT_WORDS)
    assert not clf.has_reference_images()
    with pytest.raises(NoReferenceImagesError):
        clf.reference_images()


def test_clip_zero_shot_classifier_with_tiny_random_clip(tmp_path):
    build_tiny_clip(tmp_path, ["a", "photo", "of", "cat", "dog"])
    clf = ClipZeroShotClassifier(tmp_path, ["a photo of a cat", "a photo of a dog"], labels=["cat", "dog"])
    x = torch.rand(3, 3, 20, 20)
    probs = clf.predict_proba(x)
    assert probs.shape == (3, 2)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)
    assert clf.features(torch.rand(2, 1, 16, 16)).shape == (2, 8)
    assert not clf.has_reference_images()
    with pytest.raises(FileNotFoundError):
        ClipZeroShotClassifier(tmp_path / "missing", ["a", "b"])
