FROM python:3.11-slim
WORKDIR /srv/streamkeep
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-cache-dir -e .
ENV STREAMKEEP_HOST=0.0.0.0
EXPOSE 4437
CMD ["streamkeep", "serve"]
