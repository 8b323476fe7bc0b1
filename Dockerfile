# kins-tunnel image: one image for both sides.
#   docker build -t kins-tunnel:0.1.0 .
#   kins-tunnel cloud --config /etc/kins-tunnel/cloud.yaml   (deploy/tunnel-cloud.yaml)
#   kins-tunnel edge  --config /etc/kins-tunnel/edge.yaml    (deploy/tunnel-edge.yaml)

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kins_tunnel ./kins_tunnel
# kins_tunnel/testing holds test doubles (the K3s API stand-in of the demo): never in the image.
# Into a separate prefix, so the runtime stage gets the installed package without the sources.
RUN rm -rf kins_tunnel/testing \
 && pip install --no-cache-dir --prefix=/install . \
 && test -z "$(find /install -path '*/kins_tunnel/testing*' -print -quit)"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
USER 65532:65532
WORKDIR /etc/kins-tunnel
# 8080 HTTP CONNECT proxy, 8443 the proxy over TLS, 9000 edge listener, 9090 cloud admin (the
# edge's admin is 9091).
EXPOSE 8080 8443 9000 9090
ENTRYPOINT ["kins-tunnel"]
CMD ["--help"]
