"""Block diffusion: the attention layout (mask), noise and losses."""
