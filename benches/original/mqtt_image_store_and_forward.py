#!/usr/bin/env python3
# The original Python store-and-forward client that imaged replaces, kept here as the benchmark's comparator.
# Copied unchanged from the team's shared/reference, a faithful re-implementation from the original's README.
"""Re-implementation of the original mqtt_image_store_and_forward.py.

Behaviour kept faithful to the original (as described in its README and as a
straightforward paho user writes it):
  * subscribe to image/upload, on every message write the payload to
    stored_images/image_YYYYMMDD-HHMMSS.jpg with a plain open()/write()
    (no fsync, no temp file, no rename -> NOT atomic, NOT durable; two images
    arriving in the same wall-clock second get the same name and the later
    one silently overwrites the earlier one),
  * print "Image saved: <path>" and "Image re-published on topic 'image/stored'",
  * republish the same bytes on image/stored,
  * paho's default callback API (VERSION1; paho-mqtt 2.x prints a
    DeprecationWarning for it), loop_forever().

QoS: the original calls subscribe("image/upload") and publish("image/stored", ...)
with no qos argument, i.e. QoS 0 both ways.  That is the DEFAULT here
(MQTT_QOS unset or 0).  MQTT_QOS=1 is the variant: subscribe with qos=1 and
republish with qos=1 (still paho defaults otherwise: max_inflight 20).

Only additions over the original: host/port/dir/qos come from env vars
  MQTT_HOST (default localhost), MQTT_PORT (default 1883),
  IMAGE_DIR (default stored_images), MQTT_QOS (default 0).
"""
import os
import time

import paho.mqtt.client as mqtt

HOST = os.environ.get("MQTT_HOST", "localhost")
PORT = int(os.environ.get("MQTT_PORT", "1883"))
IMAGE_FOLDER = os.environ.get("IMAGE_DIR", "stored_images")
QOS = int(os.environ.get("MQTT_QOS", "0"))

os.makedirs(IMAGE_FOLDER, exist_ok=True)


def on_connect(client, userdata, flags, rc):
    print("Connected with code", rc)
    if QOS:
        client.subscribe("image/upload", qos=QOS)
    else:
        client.subscribe("image/upload")          # original: QoS 0


def on_message(client, userdata, msg):
    # one-second resolution timestamp, exactly like the original
    name = time.strftime("%Y%m%d-%H%M%S")
    path = f"{IMAGE_FOLDER}/image_{name}.jpg"
    with open(path, "wb") as f:
        f.write(msg.payload)
    print(f"Image saved: {path}")
    if QOS:
        client.publish("image/stored", msg.payload, qos=QOS)
    else:
        client.publish("image/stored", msg.payload)   # original: QoS 0
    print("Image re-published on topic 'image/stored'")


client = mqtt.Client()
client.on_connect = on_connect
client.on_message = on_message
client.connect(HOST, PORT)
client.loop_forever()
