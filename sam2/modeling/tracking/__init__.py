"""The pieces of SAM 2's tracker (`sam2.modeling.sam2_base.SAM2Base`), one idea per module:

- `options`: the flat official keywords sorted into typed groups;
- `memory_bank`: which prompted and recent frames a frame attends to, as memory tokens;
- `object_pointers`: per-frame object tokens and their temporal encodings;
- `sam_heads`: prompt encoder + mask decoder on one frame;
- `memory_encoding`: from predicted masks to the memory encoder's input;
- `frame_step`: one tracking step, tying the above together.
"""
