# The `locust` profile: the project's locustfile against the triton service over gRPC.
FROM locustio/locust:2.32.2
COPY deploy/docker/requirements-locust.txt /tmp/requirements-locust.txt
RUN pip install --no-cache-dir -r /tmp/requirements-locust.txt
COPY core /opt/medpclip/core
COPY clients /opt/medpclip/clients
COPY tools /opt/medpclip/tools
# the tools package only for its phantom generator (numpy; no torch needed for that module)
RUN pip install --no-cache-dir --no-deps /opt/medpclip/core /opt/medpclip/clients /opt/medpclip/tools
COPY perf /opt/medpclip/perf
