"""What differs between the transformers versions the tests run with (4.53 and later)."""
import inspect


def cache_kwarg(model, cache) -> dict:
    """The cache as the keyword a model's forward and generate take: ``cache`` in the
    transformers versions whose forward names it so (5.x: ``past_key_values`` is deprecated,
    dropped by forward in 5.40 and by generate in 6.0), else ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
