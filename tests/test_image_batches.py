from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from snapvit_lightning.image_batches import check_image_batches, collect_images


def test_a_tensor_is_kept_and_batches_are_concatenated_in_order() -> None:
    x = torch.rand(5, 3, 8, 8)
    assert collect_images(x) is x
    loader = DataLoader(TensorDataset(x, torch.arange(5)), batch_size=2)  # (images, labels) batches
    assert torch.equal(collect_images(loader), x)
    batches = (b for b in (x[:3], x[3:]))
    assert torch.equal(collect_images(batches), x)  # a generator, read once: a second reader is told why it is empty
    with pytest.raises(ValueError, match=r"yielded no batches \(it is an iterator, e.g. a generator, which is read once"):
        collect_images(batches)
    with pytest.raises(ValueError, match=r"yielded no batches$"):  # an empty list is not a spent iterator
        collect_images([])
    check_image_batches(loader)  # an iterable: accepted before it is read


@pytest.mark.parametrize("source, match", [
    ("photos/", r"images must be a float tensor \[N, 3, H, W\] or an iterable of such batches .* got str"),
    (3, r"images must be a float tensor .* got int"),
    ([], r"images: the iterable yielded no batches"),
    ([torch.rand(3, 8, 8)], r"got a \[3, 8, 8\] tensor \(single images: torch.stack them into one batch\)"),
    ([torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4)], r"batches of \[3, 8, 8\] and \[3, 4, 4\] images: give images of one size"),
    ([{"image": torch.rand(2, 3, 8, 8)}], r"batches must be \[B, 3, H, W\] tensors or \(images, \.\.\.\) tuples, got dict"),
])
def test_what_cannot_be_read_as_image_batches_is_named(source, match) -> None:
    with pytest.raises(ValueError, match=match):
        collect_images(source)


def test_numpy_arrays_and_lists_of_single_images_are_refused_before_any_batch_is_read() -> None:
    import numpy as np

    from snapvit_lightning.search import EvolutionarySearch

    x = torch.rand(6, 3, 32, 32)
    with pytest.raises(ValueError, match=r"got a numpy array: pass torch.from_numpy\(array\)"):
        check_image_batches(np.zeros((6, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got a \[3, 32, 32\] tensor \(single images: torch.stack them"):
        check_image_batches([x[i] for i in range(6)])
    check_image_batches([x[:3], (x[3:], torch.zeros(3))])  # batches and (images, labels) tuples
    for images in (x.numpy(), [x[i] for i in range(6)]):  # were accepted, and refused after the scoring epoch
        with pytest.raises(ValueError, match="images"):
            EvolutionarySearch(images=images)
