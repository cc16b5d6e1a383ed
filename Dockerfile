# One image for every Tandem component: `tandem operator run`, `tandem gateway`, `tandem autoscaler`
# (the Helm chart passes the subcommand as args). Runs as the non-root user 10001 the chart expects,
# with nothing written outside /tmp (the chart mounts the root filesystem read-only).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tandem tandem
COPY sim sim
COPY router router
COPY operator operator
COPY autoscaler autoscaler
COPY bench bench
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && groupadd --gid 10001 tandem \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tandem
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081 9090
ENTRYPOINT ["tandem"]
CMD ["--help"]
