"""OpenTelemetry SDK set-up of the ``serve`` process, driven by the standard ``OTEL_*`` variables.

Only ``serve`` calls :func:`configure_sdk`; library code never installs
providers. Exporters follow the OpenTelemetry environment variables:

- ``OTEL_SDK_DISABLED=true`` installs nothing.
- ``OTEL_TRACES_EXPORTER`` and ``OTEL_METRICS_EXPORTER``: comma-separated
  ``otlp``, ``console`` or ``none``. When unset, ``otlp`` is used if an OTLP
  exporter package is importable and an OTLP endpoint variable is set
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or its per-signal form), else nothing is
  exported. Requiring the endpoint keeps an unconfigured authority from
  sending to, and logging retries against, whatever listens on localhost:4317.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``
  and ``..._METRICS_PROTOCOL``): ``grpc`` (the default, as in the SDK's own
  auto-configuration) or ``http/protobuf``.
- The exporters and processors read their own variables: endpoint, headers,
  ``OTEL_EXPORTER_OTLP_INSECURE``, timeouts, ``OTEL_BSP_SCHEDULE_DELAY``,
  ``OTEL_METRIC_EXPORT_INTERVAL``; ``OTEL_SERVICE_NAME`` and
  ``OTEL_RESOURCE_ATTRIBUTES`` name the service (default ``session-authority``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "session-authority"

_EXPORTER_CHOICES = ("otlp", "console", "none")
_PROTOCOLS = ("grpc", "http/protobuf")
_OTLP_PACKAGES = {
    "grpc": "opentelemetry-exporter-otlp-proto-grpc",
    "http/protobuf": "opentelemetry-exporter-otlp-proto-http",
}


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable or a telemetry flag is invalid; the message names it and the fix."""


@dataclasses.dataclass
class TelemetrySetup:
    """The providers that :func:`configure_sdk` installed; call :meth:`shutdown` before exit.

    Attributes:
        traces_exporters: Names of the span exporters in use, such as ``["otlp/grpc"]``.
        metrics_exporters: Names of the metric exporters and readers in use.
        prometheus_port: Port of the Prometheus endpoint, or None.
    """

    traces_exporters: list[str] = dataclasses.field(default_factory=list)
    metrics_exporters: list[str] = dataclasses.field(default_factory=list)
    prometheus_port: int | None = None
    _shutdowns: list[Callable[[], object]] = dataclasses.field(default_factory=list, init=False, repr=False)

    def shutdown(self) -> None:
        """Flush and stop every provider; errors are logged, never raised."""
        for shutdown in self._shutdowns:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - exit must not fail on telemetry
                logger.exception("telemetry shutdown failed")
        self._shutdowns.clear()


def _otlp_endpoint_set(signal: str) -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


def _otlp_importable(protocol: str) -> bool:
    try:
        if protocol == "grpc":
            import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
        else:
            import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:
        return False
    return True


def _protocol(signal: str) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    value = os.environ.get(variable) or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    value = value.strip()
    if value not in _PROTOCOLS:
        raise TelemetryConfigError(
            f"OTLP protocol {value!r} (from {variable} or OTEL_EXPORTER_OTLP_PROTOCOL) is not supported;"
            f" use one of {', '.join(_PROTOCOLS)}"
        )
    return value


def _exporter_names(signal: str) -> list[str]:
    """Return the exporter names for ``TRACES`` or ``METRICS``, resolving the default."""
    variable = f"OTEL_{signal}_EXPORTER"
    raw = os.environ.get(variable)
    if raw is None or not raw.strip():
        protocol = _protocol(signal)
        if _otlp_endpoint_set(signal) and _otlp_importable(protocol):
            return ["otlp"]
        logger.info(
            "%s not set and no OTLP endpoint configured: %s are not exported;"
            " set OTEL_EXPORTER_OTLP_ENDPOINT or %s=console",
            variable,
            signal.lower(),
            variable,
        )
        return []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in _EXPORTER_CHOICES]
    if unknown:
        raise TelemetryConfigError(
            f"{variable}={raw!r} names unsupported exporter {unknown[0]!r}; use a comma-separated list of"
            f" {', '.join(_EXPORTER_CHOICES)}"
        )
    return [name for name in names if name != "none"]


def _require_otlp(signal: str, protocol: str) -> None:
    if not _otlp_importable(protocol):
        raise TelemetryConfigError(
            f"OTEL_{signal}_EXPORTER asks for otlp over {protocol}, but {_OTLP_PACKAGES[protocol]} is not"
            f" installed; pip install {_OTLP_PACKAGES[protocol]}, or set OTEL_{signal}_EXPORTER=console or none"
        )


def _resource() -> object:
    from opentelemetry.sdk.resources import Resource

    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})


def _configure_traces(setup: TelemetrySetup, resource: object) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    names = _exporter_names("TRACES")
    if not names:
        return
    provider = TracerProvider(resource=resource)  # type: ignore[arg-type]
    for name in names:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
            setup.traces_exporters.append("console")
        else:
            protocol = _protocol("TRACES")
            _require_otlp("TRACES", protocol)
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
            exporter = OTLPSpanExporter()
            setup.traces_exporters.append(f"otlp/{protocol}")
        # The batch processor exports on its own thread, so a slow or failing
        # collector never delays the thread that ended a span.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    setup._shutdowns.append(provider.shutdown)


def _configure_metrics(setup: TelemetrySetup, resource: object, prometheus_host: str, prometheus_port: int | None) -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader

    readers: list[MetricReader] = []
    for name in _exporter_names("METRICS"):
        if name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
            setup.metrics_exporters.append("console")
        else:
            protocol = _protocol("METRICS")
            _require_otlp("METRICS", protocol)
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # type: ignore[assignment]
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            setup.metrics_exporters.append(f"otlp/{protocol}")

    if prometheus_port is not None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise TelemetryConfigError(
                "--prometheus-port needs opentelemetry-exporter-prometheus; pip install"
                " opentelemetry-exporter-prometheus, or drop --prometheus-port"
            ) from exc
        readers.append(PrometheusMetricReader())
        try:
            server, _thread = start_http_server(prometheus_port, addr=prometheus_host)
        except OSError as exc:
            raise TelemetryConfigError(
                f"cannot serve Prometheus metrics on {prometheus_host}:{prometheus_port}: {exc.strerror or exc};"
                " choose a free --prometheus-port"
            ) from exc
        setup.prometheus_port = server.server_port
        setup.metrics_exporters.append("prometheus")
        setup._shutdowns.append(server.shutdown)
        logger.info("Prometheus metrics on http://%s:%d/metrics", prometheus_host, server.server_port)

    if not readers:
        return
    provider = MeterProvider(resource=resource, metric_readers=readers)  # type: ignore[arg-type]
    metrics.set_meter_provider(provider)
    # Shut the meter provider down before the Prometheus server, so the
    # final collection runs while the endpoint still exists.
    setup._shutdowns.insert(0, provider.shutdown)


def configure_sdk(*, prometheus_host: str = "127.0.0.1", prometheus_port: int | None = None) -> TelemetrySetup:
    """Install the global tracer and meter providers chosen by the ``OTEL_*`` variables.

    Call once per process, before the authority starts.

    Args:
        prometheus_host: Address of the Prometheus endpoint.
        prometheus_port: Serve ``/metrics`` on this port; None serves none,
            0 picks a free port.

    Returns:
        What was installed; call ``shutdown()`` to flush before exit.

    Raises:
        TelemetryConfigError: A variable names an unknown exporter or
            protocol, a requested exporter package is missing, or the
            Prometheus port cannot be bound.
    """
    setup = TelemetrySetup()
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        if prometheus_port is not None:
            raise TelemetryConfigError("--prometheus-port needs the OpenTelemetry SDK, but OTEL_SDK_DISABLED=true")
        logger.info("OTEL_SDK_DISABLED=true: no spans or metrics are exported")
        return setup
    resource = _resource()
    try:
        _configure_traces(setup, resource)
        _configure_metrics(setup, resource, prometheus_host, prometheus_port)
    except BaseException:
        setup.shutdown()
        raise
    return setup
