# The `locust` profile: the project's locustfile against the triton service over gRPC.
FROM locustio/locust:2.32.2
COPY deploy/docker/requirements-locust.txt /tmp/requirements-locust.txt
RUN pip install --no-cache-dir -r /tmp/requirements-locust.txt
COPY clients /opt/medpclip/clients
COPY export /opt/medpclip/export
# the export package only for its phantom generator (no torch needed for that module)
RUN pip install --no-cache-dir --no-deps /opt/medpclip/clients /opt/medpclip/export
COPY perf /opt/medpclip/perf
