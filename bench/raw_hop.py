"""The baseline hop: raw pika, consume and republish with manual acks, nothing else.

python -m bench.raw_hop AMQP_URL EXCHANGE QUEUE PREFETCH"""

from __future__ import annotations

import json
import signal
import sys

import pika

from bench.passthrough import NEXT


def main(url: str, exchange: str, queue: str, prefetch: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=int(prefetch))

    def on_message(ch, method, properties, body):
        emitted, payload = NEXT[properties.type]
        out = json.dumps(payload(json.loads(body)["report_id"])).encode()
        ch.basic_publish(
            exchange,
            emitted,
            out,
            pika.BasicProperties(
                content_type="application/json", delivery_mode=2, type=emitted, message_id=properties.message_id
            ),
        )
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(queue, on_message)
    signal.signal(signal.SIGTERM, lambda *_: channel.stop_consuming())
    channel.start_consuming()
    connection.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
