"""megaclip: tensor-parallel CLIP pre-training."""
