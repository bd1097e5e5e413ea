"""The inputs, metric and graders shared by the two-process sweep and its one-process check."""

from vlm_probe.analyses import metrics as M


def prompts(vlm, tiny):
    batch = vlm.prepare(["how many red circles ?"] * 6, [[tiny.image(i)] for i in range(6)])
    return batch[:3], batch[3:]


def metric(vlm):
    """Per-sample targets: a different token pair for each of the 3 samples."""
    return M.logit_diff(vlm.tokenizer, ["3", "4", "5"], ["7", "8", "9"], 3)


def graders():
    """One grader per sample, each accepting a different set of answers."""
    return [lambda answer, i=i: len(answer) % 3 == i for i in range(3)]
