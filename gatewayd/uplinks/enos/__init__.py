"""EnOS uplink: a gateway device on the EnOS IoT hub over MQTT (see `uplink.py`)."""

from gatewayd.uplinks.enos.config import DeviceMapping, EnosConfig
from gatewayd.uplinks.enos.uplink import EnosUplink

__all__ = ["DeviceMapping", "EnosConfig", "EnosUplink"]
