"""The tiny world's pretraining batches: hard negatives and multi-positive targets."""

import torch

from ci_core.data import tiny_world


def _words(captions, vocabulary):
    """The words of ``vocabulary`` that the captions use."""
    return {word for c in captions for word in c.rstrip(".").split() if word in vocabulary}


def test_matches_mark_every_caption_that_describes_the_image():
    images, captions, matches = tiny_world.pretraining_batch(64, 32, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and len(captions) == 64
    assert matches.diagonal().all()  # its own caption always describes an image
    assert matches.sum() > 64  # and some captions describe other images too (a red circle is a red circle)


def test_colour_focus_batches_have_one_colour_and_many_shapes():
    _, captions, _ = tiny_world.pretraining_batch(64, 32, torch.Generator().manual_seed(0), focus=1.0)
    assert len(_words(captions, tiny_world.COLOURS)) == 1
    assert len(_words(captions, tiny_world.SHAPES)) > 3
