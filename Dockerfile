# One image for servegate and the demo model server (docker-compose.yml runs it twice).
#   servegate (default):  servegate run --config /app/config/servegate.yaml
#   demo model:           gunicorn demo.model:app --bind 0.0.0.0:8000
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin servegate

COPY pyproject.toml README.md ./
COPY proxy/ proxy/
COPY demo/ demo/
COPY config/ config/

# The package ships only `proxy`; `demo` is imported from /app (gunicorn puts its working
# directory on sys.path). gunicorn is here for the demo model only.
RUN pip install --no-cache-dir . "gunicorn>=22" \
    && rm -rf build servegate.egg-info

USER servegate

# 8080: data port; 9464: admin port (/metrics, /healthz, /readyz).
EXPOSE 8080 9464

# slim has no curl; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
# The demo model service overrides this with a check on its own /health.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]

CMD ["servegate", "run", "--config", "/app/config/servegate.yaml"]
