# lowmark's services (serve, watermark, apply, status) in one image; docker-compose.yml
# runs one container per service next to the apache/kafka image.
#
#   docker build -t lowmark:dev .
#   docker run --rm lowmark:dev lowmark --help
FROM python:3.11-slim-bookworm

WORKDIR /src
# Only what the package needs: no .venv, tests or local state end up in the image.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
COPY schemas ./schemas
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/lowmark lowmark \
    && mkdir -p /etc/lowmark /var/lib/lowmark/primary /var/lib/lowmark/dr1 \
    && chown -R lowmark /var/lib/lowmark
# (A named volume mounted on primary/ or dr1/ starts as a copy of these: owned by lowmark.)

USER lowmark
WORKDIR /var/lib/lowmark
ENV LOWMARK_HOME=/var/lib/lowmark \
    PYTHONUNBUFFERED=1
# NBD (serve) and the Prometheus endpoints of serve / watermark / apply.
EXPOSE 10809 9464 9465 9466
CMD ["lowmark", "--help"]
