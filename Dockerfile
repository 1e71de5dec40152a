FROM python:3.11-slim
WORKDIR /srv/streamkeep
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . && useradd --system --no-create-home streamkeep
USER streamkeep
ENV STREAMKEEP_HOST=0.0.0.0
EXPOSE 4437
# Exec form: SIGTERM reaches streamkeep itself, which ends its streams before exiting.
CMD ["streamkeep", "serve"]
