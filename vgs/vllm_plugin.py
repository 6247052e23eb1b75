"""vLLM general plugin: runs in every vLLM process (front end and spawned workers).

Registered through the `vllm.general_plugins` entry point in pyproject.toml; registering in
the main script alone does not reach workers started with spawn. Lazy "module:Class" strings
keep this import cheap. It arms the parent-death signal in vLLM's engine processes
(`vgs.lifecycle`), so a killed `vgs eval` or `vgs serve` leaves no engine behind.
"""


def register() -> None:
    from vllm import ModelRegistry

    from vgs.lifecycle import die_with_parent

    die_with_parent()
    if "Qwen2ForClassifier" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("Qwen2ForClassifier", "vgs.vllm_model:Qwen2ForClassifierPooling")
