"""TokenLayout against the processors' own outputs, for every family."""

from __future__ import annotations

import pytest
import torch

import vlm_probe
from vlm_probe.errors import InputError


def _texts_and_images(vlm, tiny):
    prompts = ["how many red circles ?", "which shape is left of the blue square ?"]
    images = [[tiny.image(1)], [tiny.image(2), tiny.image(3)]]
    return prompts, images


def test_vision_positions_match_processor_batch(family: str, zoo) -> None:
    """Left padding, two images in one row: our collated batch equals the processor's own batch."""
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    prompts, images = _texts_and_images(vlm, tiny)
    batch = vlm.prepare(prompts, images)
    processor = vlm.processor
    processor.tokenizer.padding_side = "left"
    theirs = processor(text=batch.texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(batch.inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(batch.inputs["attention_mask"], theirs["attention_mask"])
    expected = theirs["input_ids"] == vlm.image_token_id
    assert torch.equal(batch.layout.mask("vision"), expected)
    for key, value in theirs.items():
        if key in batch.inputs and key.startswith("pixel"):
            assert torch.equal(batch.inputs[key], value), key
    # the two images of row 1 are told apart, in order, each with its own token count
    row = batch.layout[1]
    assert row.n_images == 2
    first, second = row.spans["image0"], row.spans["image1"]
    assert max(first) < min(second)
    assert sorted(first + second) == sorted(row.spans["vision"])
    assert len(first) == len(second) > 0, "two images of one size get as many tokens each"


def test_text_groups_decode_to_their_text(family: str, zoo) -> None:
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare("how many red circles ?", images=[tiny.image()], system="you are helpful", answers="3")
    row = batch.layout[0]
    ids = batch.inputs["input_ids"][0]
    decode = vlm.tokenizer.convert_ids_to_tokens
    assert decode(ids[list(row.spans["question"])].tolist()) == ["how", "many", "red", "circles", "?"]
    assert decode(ids[list(row.spans["system"])].tolist()) == ["you", "are", "helpful"]
    assert decode(ids[list(row.spans["answer"])].tolist()) == ["3"]
    assert row.spans["last_prompt"] == (row.spans["answer"][0] - 1,)
    assert row.spans["last"] == (batch.width - 1,)
    groups = [set(row.spans[g]) for g in ("vision", "system", "question", "answer", "template")]
    assert sum(len(g) for g in groups) == batch.width, "groups must partition the row"
    assert set().union(*groups) == set(range(batch.width))


def test_qwen_cells_follow_the_merged_patch_grid(zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    vlm = vlm_probe.load(tiny)
    patch = tiny.sizes.patch
    image = tiny.image(0, size=(2 * patch * 2, 2 * patch * 3))  # 2 x 3 merged cells
    row = vlm.prepare("what color ?", images=[image]).layout[0]
    assert row.tiles[(0, 0)].rows == 2 and row.tiles[(0, 0)].cols == 3
    cells = [(c.row, c.col) for c in row.cells]
    assert cells == [(r, c) for r in range(2) for c in range(3)]


def test_square_and_anyres_cells(zoo) -> None:
    llava = vlm_probe.load(zoo("llava"))
    row = llava.prepare("what color ?", images=[zoo("llava").image()]).layout[0]
    side = zoo("llava").sizes.image_size // zoo("llava").sizes.patch
    assert [(c.row, c.col) for c in row.cells] == [(r, c) for r in range(side) for c in range(side)]
    nxt = zoo("llava_next")
    row = vlm_probe.load(nxt).prepare("what color ?", images=[nxt.image()]).layout[0]
    base = [c for c in row.cells if c.tile == 0]
    assert len(base) == side * side
    tile = row.tiles[(0, 1)]
    hires = [c for c in row.cells if c.tile == 1]
    newlines = [c for c in hires if c.row is None]
    assert len(newlines) == tile.rows, "one newline token closes each high-resolution row"
    assert len(hires) == tile.rows * (tile.cols + 1)


def test_idefics_tiles_know_their_boxes(zoo) -> None:
    tiny = zoo("idefics3")
    row = vlm_probe.load(tiny).prepare("what color ?", images=[tiny.image()]).layout[0]
    kinds = {k: g.kind for k, g in row.tiles.items()}
    assert list(kinds.values()) == ["tile", "tile", "global"]
    assert row.tiles[(0, 0)].box == (0.0, 0.0, 1.0, 0.5)
    assert row.tiles[(0, 1)].box == (0.0, 0.5, 1.0, 1.0)


def test_batch_layout_uniform_groups_and_masks(qwen, zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    same = qwen.prepare(["how many ?", "what color ?"], [[tiny.image(1)], [tiny.image(2)]])
    assert torch.equal(same.layout.vision, same.layout[0].vision)
    mixed = qwen.prepare(["how many ?", "what color is the big square ?"], [[tiny.image(1)], [tiny.image(2)]])
    with pytest.raises(InputError, match="different positions"):
        mixed.layout.vision
    mask = mixed.layout.mask("vision")
    assert mask.shape == mixed.inputs["input_ids"].shape
    assert torch.equal(mask, mixed.inputs["input_ids"] == qwen.image_token_id)


def test_align_and_width_mismatch_error(qwen, zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    a = qwen.prepare("how many ?", images=[tiny.image(1)])
    b = qwen.prepare("what color is the big square ?", images=[tiny.image(2)])
    with pytest.raises(InputError, match="vlm_probe.align"):
        with qwen.trace() as tracer:
            with tracer.invoke(a):
                pass
            with tracer.invoke(b):
                pass
    a2, b2 = vlm_probe.align(a, b)
    assert a2.width == b2.width == b.width
    shift = b.width - a.width
    assert a2.layout[0].spans["vision"] == tuple(p + shift for p in a.layout[0].spans["vision"])
    with qwen.trace() as tracer:
        with tracer.invoke(a2):
            la = qwen.lm_head.output.save()
        with tracer.invoke(b2):
            lb = qwen.lm_head.output.save()
    with torch.no_grad():
        alone = qwen.hf(**a.inputs).logits
    torch.testing.assert_close(la[0, shift:], alone[0], atol=1e-5, rtol=0)
    assert lb.shape[1] == b.width


def test_batch_slicing_and_concatenation_are_exact(qwen, zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    a = qwen.prepare("how many ?", images=[tiny.image(1)])
    b = qwen.prepare("what color ?", images=[tiny.image(2)])
    both = a + b
    assert len(both) == 2
    for key in a.inputs:
        assert torch.equal(both[0].inputs[key], a.inputs[key]), key
    assert both.repeat(2).texts == [a.texts[0], a.texts[0], b.texts[0], b.texts[0]]
