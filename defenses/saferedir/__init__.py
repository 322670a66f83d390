"""SafeRedir (Liu et al., "SafeRedir: Prompt Embedding Redirection for Robust Unlearning in
Image Generation Models", arXiv 2601.08623): a learned redirector of prompt embeddings.

- `networks`: the redirector (latent-aware safety classifier and token-level delta generator);
- `hooks`: the inference rule as a sampler hook, with the released behaviour as defaults;
- `defense`: the `saferedir` defense plugin;
- `train`: the `saferedir` trainer (`arena train saferedir CONFIG`);
- `loading`: our safetensors checkpoints and the authors' released state dict.
"""

from defenses.saferedir.defense import SafeRedir
from defenses.saferedir.hooks import RedirectionOptions, SafeRedirHook
from defenses.saferedir.networks import Redirector, RedirectorDims, RedirectorOutput

__all__ = [
    "RedirectionOptions",
    "Redirector",
    "RedirectorDims",
    "RedirectorOutput",
    "SafeRedir",
    "SafeRedirHook",
]
