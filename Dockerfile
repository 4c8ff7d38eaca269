# The hub's processes (init, worker, simulator) for docker-compose.yml: `clinhub` installed from this checkout.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY clinhub ./clinhub
COPY producers ./producers
COPY streams ./streams
COPY schemas ./schemas
COPY sinks ./sinks
# Every dependency ships manylinux wheels, so no compiler is needed; the wheels are carried to the runtime stage.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    CLINHUB_STREAM_DATA_DIR=/var/lib/clinhub/faust
RUN groupadd --system --gid 10001 clinhub \
    && useradd --system --uid 10001 --gid clinhub --home-dir /home/clinhub --create-home \
       --shell /usr/sbin/nologin clinhub \
    && mkdir -p /var/lib/clinhub/faust \
    && chown -R clinhub:clinhub /var/lib/clinhub
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels clinhub
USER clinhub
WORKDIR /home/clinhub
EXPOSE 9464
CMD ["clinhub", "stream", "worker"]
