# The code location and the run workers (CPU). GPU training workers: Dockerfile.cuda.
#   docker build -t lora-assets:1 .
#   docker build --build-arg CONVERT_BASE_MODEL=1 -t lora-assets:1 .   # SmolLM2 converted at build time
FROM python:3.11-slim-bookworm

WORKDIR /opt/lora_assets
COPY pyproject.toml constraints.txt README.md workspace.yaml dagster.yaml ./
COPY scripts ./scripts
COPY deploy ./deploy
COPY lora_assets ./lora_assets
# The same install script as `make` and CI; a CPU build of torch.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN TORCH_INDEX_URL=$TORCH_INDEX_URL scripts/install.sh /opt/venv prod

ENV PATH=/opt/venv/bin:$PATH \
    LORA_ASSETS_HOME=/var/lib/lora_assets \
    DAGSTER_HOME=/opt/dagster/home
RUN mkdir -p $LORA_ASSETS_HOME $DAGSTER_HOME
# Optional: convert SmolLM2 into the image, so no worker ever converts it (~35 s, ~540 MB).
ARG CONVERT_BASE_MODEL=0
RUN if [ "$CONVERT_BASE_MODEL" = "1" ]; then \
      python -c "from lora_assets.training import resolve_base_model; resolve_base_model('smollm2-135m')"; fi

EXPOSE 4000
# The code server; the webserver, the daemon and run workers override the command (deploy/).
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "lora_assets.definitions"]
