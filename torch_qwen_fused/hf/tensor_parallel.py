"""What one rank holds of a Qwen3 attention layer under Hugging Face's tensor parallelism.

``from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"))`` (or the older ``tp_plan="auto"``)
under ``torchrun`` shards ``q_proj``/``k_proj``/``v_proj`` by output features ("colwise") and ``o_proj`` by input
features ("rowwise", HF all-reduces its output): each rank projects, caches and attends its own slice of the
heads, and sees every token. Its weights are ``DTensor``s; the local shard says how many heads the rank has.
"""

import torch

__all__ = ["local_rows", "local_head_counts", "local_kv_heads", "tensor_parallel_size"]


def local_rows(weight: torch.Tensor) -> int:
    """Output features of this rank's shard of a linear weight (all of them for a plain tensor)."""
    to_local = getattr(weight, "to_local", None)   # torch.distributed.tensor.DTensor
    return (to_local() if to_local is not None else weight).shape[0]


def tensor_parallel_size(config) -> int:
    """The model's tensor-parallel size as transformers records it on a config it loaded distributed, else 1."""
    distributed = getattr(config, "distributed_config", None)
    return getattr(distributed, "tp_size", None) or 1


def local_kv_heads(config, num_kv_heads: int) -> int:
    """The kv heads a rank's PagedKVCache holds when built from the model config: all of them, or the rank's
    share under HF tensor parallelism (the config of a model loaded with a ``DistributedConfig``/``tp_plan``:
    its heads split evenly over the ranks)."""
    ranks = tensor_parallel_size(config)
    if num_kv_heads % ranks:
        raise ValueError(f"PagedKVCache: num_key_value_heads ({num_kv_heads}) is not divisible by the model's "
                         f"tensor-parallel size ({ranks}): its ranks do not hold whole kv heads")
    return num_kv_heads // ranks


def local_head_counts(module) -> tuple:
    """(query heads, kv heads) of this rank's shard of a Qwen3 attention module.

    Raises NotImplementedError where the shard is not whole heads: HF's colwise plan splits ``k_proj``'s output
    features evenly over the ranks, so a model with fewer kv heads than ranks (or a count the ranks do not
    divide) gives each rank part of a head, and HF's own forward fails at its reshape to heads. HF does not
    replicate kv heads (vLLM does); neither does this patch: it refuses before anything runs.
    """
    head_dim = module.head_dim
    config = module.config
    q_rows, kv_rows = local_rows(module.q_proj.weight), local_rows(module.k_proj.weight)
    if not kv_rows or q_rows % head_dim or kv_rows % head_dim or (q_rows // head_dim) % (kv_rows // head_dim):
        raise NotImplementedError(
            f"patch_model: layer {module.layer_idx} holds {q_rows} q_proj and {kv_rows} k_proj output features on "
            f"this rank, not whole heads of {head_dim} in GQA groups (num_attention_heads="
            f"{config.num_attention_heads}, num_key_value_heads={config.num_key_value_heads}, tensor-parallel size "
            f"{tensor_parallel_size(config)}). HF's tp_plan shards the projections by output features and does not "
            "replicate kv heads, so its own forward fails here too: use a tensor-parallel size that divides "
            "num_key_value_heads")
    return q_rows // head_dim, kv_rows // head_dim
