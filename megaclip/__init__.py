"""megaclip: tensor-parallel CLIP pre-training."""
import warnings

# megatron-core warns on import when apex / transformer-engine are absent; megaclip needs neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
