"""What an output stride allows: the labels reduced to a stride-s grid and brought back."""
import torch

from fcn_models.metrics import ConfusionMatrix, stride_ceiling, stride_ceiling_maps
from fcn_models.voc import VOID


def score(label, stride):
    matrix = ConfusionMatrix(21)
    matrix.update(stride_ceiling(label, stride), label)
    return matrix.scores()["mean_iu"]


def test_a_finer_stride_gives_back_more_of_a_block_only_its_edges_blur():
    label = torch.zeros(64, 96, dtype=torch.long)
    label[32:64, 32:64] = 5
    ceilings = [score(label, s) for s in (32, 16, 8)]
    assert 0.85 < ceilings[0] < ceilings[1] < ceilings[2] and ceilings[2] > 0.99
    # Away from the block's edges every pixel comes back as it was.
    assert torch.equal(stride_ceiling(label, 8)[36:60, 36:60], label[36:60, 36:60])


def test_small_objects_are_lost_at_stride_32_and_kept_at_stride_8():
    label = torch.zeros(96, 128, dtype=torch.long)
    label[40:52, 40:52] = 3  # 12 pixels: a fraction of one 32-pixel cell
    label[10:20, 90:100] = VOID
    ceilings = [score(label, s) for s in (32, 16, 8)]
    assert ceilings[0] <= ceilings[1] < ceilings[2]
    assert ceilings[0] < 0.6 and ceilings[2] > 0.75
    # One pixel of a shifted object moves the stride-8 ceiling: the reduction sees every pixel.
    shifted = label.clone()
    shifted[40:52, 40:53] = 3
    assert score(shifted, 8) != ceilings[2]


def test_void_pixels_vote_for_no_class():
    label = torch.full((32, 32), VOID, dtype=torch.long)
    label[:, :4] = 7
    assert set(stride_ceiling(label, 32).unique().tolist()) == {7}


def test_all_strides_at_once_are_the_definition_pixel_for_pixel():
    # The definition written out: each class's share of a cell (void counting for none),
    # upsampled bilinearly, the most likely class per pixel (ties to the lower class id).
    def defined(label, stride):
        valid = label != VOID
        onehot = torch.stack([((label == c) & valid).float() for c in range(21)])[None]
        shares = torch.nn.functional.avg_pool2d(onehot, stride, stride, ceil_mode=True)
        back = torch.nn.functional.interpolate(shares, size=label.shape, mode="bilinear", align_corners=False)
        return back[0].argmax(0)

    generator = torch.Generator().manual_seed(0)
    for height, width in ((150, 160), (97, 45), (33, 200)):
        # Blocks of a few classes and of void, so cells hold ties and mixtures, and scattered void.
        blocks = torch.tensor([0, 5, 20, VOID])[torch.randint(0, 4, (height // 8 + 1, width // 8 + 1),
                                                              generator=generator)]
        label = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:height, :width]
        label[torch.rand(label.shape, generator=generator) < 0.1] = VOID
        maps = stride_ceiling_maps(label, (32, 16, 8))
        for stride in (32, 16, 8):
            assert torch.equal(maps[stride], defined(label, stride)), (height, width, stride)
