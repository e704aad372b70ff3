"""What both backends share: the mlx-lm adapter description. (Model names are resolved by
`mlx_distill.models.resolve_model`, the one resolver every command uses.)"""


class BackendBase:
    """Subclasses set `cfg`, `model_path` and `num_layers` (LoRA blocks) while loading/preparing."""

    def lora_parameters(self) -> dict:
        p = {"rank": self.cfg.lora_rank, "scale": self.cfg.lora_scale, "dropout": self.cfg.lora_dropout}
        if self.cfg.lora_keys:
            p["keys"] = list(self.cfg.lora_keys)
        return p

    def adapter_config(self) -> dict:
        """mlx-lm's adapter_config.json (read by `mlx_lm generate --adapter-path`, `mlx_lm fuse`),
        so a run folder from either backend loads in mlx-lm as it is."""
        cfg = self.cfg
        return {"model": self.model_path, "fine_tune_type": cfg.fine_tune_type, "num_layers": self.num_layers,
                "lora_parameters": self.lora_parameters(), "data": cfg.data, "seed": cfg.seed,
                "max_seq_length": cfg.max_seq_length, "trained_by": "mlx_distill"}
