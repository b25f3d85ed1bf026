"""Framework adapters: ``apo_kernels.integrations.trl`` and ``apo_kernels.integrations.verl``."""
