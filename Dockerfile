# megaclip on a CUDA machine: an NGC PyTorch base brings torch, NCCL and (optionally) transformer-engine.
FROM nvcr.io/nvidia/pytorch:25.09-py3
WORKDIR /opt/megaclip
COPY pyproject.toml README.md ./
COPY megaclip ./megaclip
RUN pip install --no-cache-dir -e ".[test]"
COPY examples ./examples
COPY tools ./tools
COPY tests ./tests
# Example: docker run --gpus all --ipc=host IMAGE torchrun --nproc-per-node 8 -m megaclip.pretrain --config-name clip_L14 tp=2
CMD ["torchrun", "--nproc-per-node", "1", "-m", "megaclip.pretrain"]
