"""vLLM general plugin: runs in every vLLM process (front end and spawned workers).

Registered through the `vllm.general_plugins` entry point in pyproject.toml; registering in
the main script alone does not reach workers started with spawn. Lazy "module:Class" strings
keep this import cheap.
"""


def register() -> None:
    from vllm import ModelRegistry

    if "Qwen2ForClassifier" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("Qwen2ForClassifier", "value_models.vllm_model:Qwen2ForClassifierPooling")
