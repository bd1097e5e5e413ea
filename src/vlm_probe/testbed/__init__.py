"""The CPU testbed (a tiny Qwen2.5-VL trained Base -> IN -> RL by vlm_probe) and the tiny-model zoo.

    from vlm_probe.testbed import build_testbed
    testbed = build_testbed()                 # cached; build_testbed(reduced=True) in seconds
    models = testbed.load_set("IN", "RL")
"""

from .build import Testbed, build_rl_variant, build_testbed
from .recipe import Recipe
from .zoo import FAMILIES, TinyVLM, tiny_vlm

__all__ = ["FAMILIES", "Recipe", "Testbed", "TinyVLM", "build_rl_variant", "build_testbed", "tiny_vlm"]
